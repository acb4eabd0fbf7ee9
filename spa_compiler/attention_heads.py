"""Attention heads as the rotation sees them: which projections write and read one head group.

A group of head dimensions (``--head-dims``: position d of every head) can have its heads given
a new basis (:mod:`spa_compiler.head_rotation`) only when every node on the head dimensions' way
commutes with a per-head basis change: 2-D MatMul projections into the unit axis (with a
constant bias Add; or a plain Gemm with its bias), data movement, shape reads, scalar scaling,
slicing along another axis or into parts of whole heads, the products of two activations, and a
2-D MatMul or Gemm reading the unit axis (the output projection). A projection's
role follows from the products it reaches: operand 0 of a product that contracts the unit axis
(queries), operand 1 (keys), a product whose output keeps it (values). A packed projection (q, k
and v from one MatMul, reshaped to ``[.., 3, H, D]`` and taken apart by Slice, Gather or Split)
has one block of heads per role, in the order of the slices (GPT-2's ``c_attn`` is a Gemm whose
output is split into three along the unit axis itself). Heads pair by their order along the
projections. onnxruntime's fused ``Attention`` (``com.microsoft``) is such a packed projection
with the products inside it: its weight's columns are Q, K and V slabs by position, so its
role per block is read from the columns (queries and keys, or values), its bias is the
projection's, and the op commutes with the change of basis (each head on its own, no rotary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis import Analysis, Group
from .calibrate import ConsumerLayer
from .ir import Graph, Node
from .ops.fused_attention import attention_sizes

__all__ = ["HeadBasis", "Projection", "rotatable_heads"]

_DATA_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class Projection:
    """A projection's share of one head group: ``heads[h, k]`` is the column (the row, for the
    output projection) of head h's element in unit k."""

    layer: ConsumerLayer
    heads: np.ndarray


@dataclass(frozen=True)
class HeadBasis:
    """One attention group's projections: queries and keys, values and output, or both (a group
    whose head-dim constant they share). A packed projection (q, k and v from one MatMul, sliced
    apart) appears once per role, each with its block of heads."""

    group: Group
    query_key: tuple[Projection, Projection] | None
    value_output: tuple[Projection, Projection] | None

    @property
    def measured(self) -> list[ConsumerLayer]:
        """The layers whose input statistics the rotation reads: the query and key projections,
        and the output projection (whose input is the attention output)."""
        parts = [*(self.query_key or ()), *(self.value_output[1:] if self.value_output else ())]
        return list({part.layer.node: part.layer for part in parts}.values())


def _unit_layout(group: Group, axis_id: int) -> np.ndarray | None:
    """``[rows, units]`` indices of one member axis (sorted within each unit), or None when the
    units do not all hold the same number of them."""
    per_unit = [np.sort(unit.members.get(axis_id, np.empty(0, dtype=np.int64))) for unit in group.units]
    counts = {len(indices) for indices in per_unit}
    if len(counts) != 1 or 0 in counts:
        return None
    return np.stack(per_unit, axis=1)


def _matmul_weight(graph: Graph, node: Node) -> str | None:
    """The 2-D float initializer a MatMul (or a Gemm computing ``x W + b``: no transposes, unit
    alpha and beta, a 1-D bias) multiplies by (not a quantized weight's dequantized value:
    rotating it would need new scales), or None."""
    if node.scope or not (node.op_type == "MatMul" and len(node.inputs) == 2 or _plain_gemm(graph, node)):
        return None
    weight = node.inputs[1]
    plain = graph.is_constant(weight) and weight not in graph.quantized and weight not in graph.integer_weights
    return weight if plain and graph.constants[weight].ndim == 2 and graph.constants[weight].dtype.kind == "f" else None


def _plain_gemm(graph: Graph, node: Node) -> bool:
    """A Gemm that is ``x W + b``: no transposes, unit alpha and beta, a constant 1-D bias or none."""
    if node.op_type != "Gemm" or any(node.attr(name, 0) for name in ("transA", "transB")):
        return False
    if any(float(node.attr(name, 1.0)) != 1.0 for name in ("alpha", "beta")):
        return False
    bias = next(iter(node.inputs[2:3]), "")
    return not bias or (graph.is_constant(bias) and graph.constants[bias].ndim == 1)


def _inner_bias(graph: Graph, node: Node) -> str | None:
    """The bias a node adds inside itself: a fused Attention's or a plain Gemm's input 2."""
    if _fused_attention(node) or _plain_gemm(graph, node):
        return next(iter(node.inputs[2:3]), None) or None
    return None


def _fused_attention(node: Node) -> bool:
    return node.op_type == "Attention" and node.domain == "com.microsoft"


def _fused_roles(graph: Graph, node: Node, layout: np.ndarray) -> list[str]:
    """The roles of a group's columns of a fused Attention's packed weight, one per block of
    ``num_heads`` rows of ``layout`` (``[rows, units]``): "query", "key" or "value" by the slab
    (Q, K, V) the block's columns lie in; [] when a block straddles two."""
    heads, hq, _ = attention_sizes(node, graph.constants[node.inputs[1]].shape[1])
    if heads <= 0 or len(layout) % heads:
        return []
    slabs = [np.searchsorted([hq, 2 * hq], block, side="right") for block in np.split(layout, len(layout) // heads)]
    if any(len(set(slab.ravel())) != 1 for slab in slabs):
        return []
    return [("query", "key", "value")[int(slab.flat[0])] for slab in slabs]


def _scalar_scaling(graph: Graph, node: Node) -> bool:
    if node.op_type not in ("Mul", "Div"):
        return False
    constants = [name for name in node.inputs if graph.is_constant(name)]
    return len(constants) == 1 and graph.constants[constants[0]].size == 1 and (
        node.op_type == "Mul" or node.inputs[1] == constants[0])


def _bias_add(graph: Graph, node: Node, members: dict[str, int]) -> bool:
    constants = [name for name in node.inputs if graph.is_constant(name)]
    return node.op_type == "Add" and len(constants) == 1 and constants[0] in members


def rotatable_heads(analysis: Analysis) -> list[HeadBasis]:
    """The head-dimension groups whose every tensor is written and read by nodes that commute
    with a per-head basis change: 2-D MatMul projections into the unit axis (with a constant
    bias Add), data movement, scalar scaling, slicing along another axis, the products of two
    activations, and a 2-D MatMul reading the unit axis (the output projection)."""
    graph, found = analysis.graph, []
    for group in analysis.groups:
        if analysis.kind(group) != "head dims" or any(unit.blocked for unit in group.units):
            continue
        basis = _head_basis(analysis, graph, group)
        if basis is not None:
            found.append(basis)
    return found


def _head_basis(analysis: Analysis, graph: Graph, group: Group) -> HeadBasis | None:
    refs = {axis_id: analysis.axes[axis_id] for axis_id in group.axes}
    members = {ref.tensor: ref.axis for ref in refs.values()}
    whole_heads = {ref.tensor for axis_id, ref in refs.items() if _unit_layout(group, axis_id) is not None}
    parts: dict[str, list[Projection]] = {}
    biases: dict[str, np.ndarray] = {}
    for axis_id, ref in refs.items():
        if not ref.constant:
            node = graph.producer.get(ref.tensor)
            readers = graph.consumers.get(ref.tensor, [])
            if node is None or not all(_commutes(graph, n, members, whole_heads) for n in [node, *readers]):
                return None
            continue
        readers, layout = graph.consumers.get(ref.tensor, []), _unit_layout(group, axis_id)
        if len(readers) != 1 or layout is None:
            return None
        reader = readers[0]
        fused = _fused_attention(reader)
        if _bias_add(graph, reader, members) or ref.tensor == _inner_bias(graph, reader):
            biases[ref.tensor] = layout
            continue
        if fused and ref.tensor == reader.inputs[1] and ref.axis == 1:
            layer = ConsumerLayer(reader.name, reader.op_type, reader.inputs[0], ref.tensor, 0, 1, _inner_bias(graph, reader))
            roles = _fused_roles(graph, reader, layout)
        elif _matmul_weight(graph, reader) == ref.tensor:
            bias = _inner_bias(graph, reader) or _bias(graph, reader, members)
            layer = ConsumerLayer(reader.name, reader.op_type, reader.inputs[0], ref.tensor, 0, 1, bias)
            roles = _roles(graph, reader.name, members) if ref.axis == 1 else ["output"]
        else:
            return None
        if not roles or len(layout) % len(roles):
            return None
        for role, block in zip(roles, _role_blocks(graph, reader, layout, len(roles))):
            parts.setdefault(role, []).append(Projection(layer, block))
    for name, layout in biases.items():
        if not any(p.layer.bias == name and np.array_equal(layout, _full_layout(parts, p.layer))
                   for projections in parts.values() for p in projections):
            return None
    pairs = {first: (parts[first][0], parts[second][0]) for first, second in (("query", "key"), ("value", "output"))
             if len(parts.get(first, [])) == 1 and len(parts.get(second, [])) == 1
             and parts[first][0].heads.shape == parts[second][0].heads.shape}
    if not pairs or sum(len(projections) for projections in parts.values()) != 2 * len(pairs):
        return None
    return HeadBasis(group, pairs.get("query"), pairs.get("value"))


def _role_blocks(graph: Graph, node: Node, layout: np.ndarray, count: int) -> list[np.ndarray]:
    """The rows of a packed projection's layout (``[rows, units]``, rows in column order) that
    each of its ``count`` roles holds: consecutive blocks when the roles are outside the heads
    (``[roles, H, D]``, or slices along the columns), every ``count``-th row when its output is
    reshaped with the roles inside each head (``[H, roles, D]``: BLOOM's query_key_value)."""
    if count > 1 and _roles_inside_heads(graph, node, count):
        return [layout[role::count] for role in range(count)]
    return np.split(layout, count)


def _roles_inside_heads(graph: Graph, node: Node, count: int) -> bool:
    """Whether ``node``'s output goes (through a bias Add; Shape reads aside) to a Reshape whose
    last three axes are ``[H, count, D]`` with ``H != count``."""
    name = node.outputs[0]
    while len(readers := [n for n in graph.consumers.get(name, []) if n.op_type != "Shape"]) == 1:
        reader = readers[0]
        if reader.op_type == "Reshape":
            shape = graph.shapes[reader.outputs[0]]
            return len(shape) >= 3 and shape[-2] == count and shape[-3] != count
        if reader.op_type != "Add":
            return False
        name = reader.outputs[0]
    return False


def _full_layout(parts: dict[str, list[Projection]], layer: ConsumerLayer) -> np.ndarray:
    """A projection's whole layout: the blocks of all its roles, in order."""
    return np.sort(np.concatenate([p.heads for ps in parts.values() for p in ps if p.layer is layer]), axis=0)


def _roles(graph: Graph, node_name: str, members: dict[str, int]) -> list[str]:
    """What a projection into the unit axis computes, from the products of two activations its
    output reaches through the group's tensors: "query" (operand 0 of a product that contracts
    the unit axis), "key" (operand 1), "value" (a product whose output keeps it). A packed
    projection, sliced apart on the way (Slice, Gather or Split along another axis), computes
    several, listed in the order of the slices; [] when that order is not clear."""
    found: dict[str, set[int | None]] = {}
    frontier = [(out, None) for out in graph.node_by_name[node_name].outputs]
    seen = set()
    while frontier:
        name, part = frontier.pop()
        seen.add(name)
        for reader in graph.consumers.get(name, []):
            if reader.op_type == "MatMul" and not any(graph.is_constant(i) for i in reader.inputs):
                role = "value" if reader.outputs[0] in members else ("query", "key")[reader.inputs.index(name)]
                found.setdefault(role, set()).add(part)
                continue
            for position, out in enumerate(reader.outputs):
                if out in members and out not in seen:
                    index = _slice_index(graph, reader, position)
                    frontier.append((out, index if index is not None else part))
    if any(len(indices) != 1 for indices in found.values()):
        return []
    order = {role: next(iter(indices)) for role, indices in found.items()}
    if len(order) == 1:
        return list(order)
    if sorted(order.values(), key=str) != list(range(len(order))):
        return []
    return sorted(order, key=order.get)


def _slice_index(graph: Graph, node: Node, position: int) -> int | None:
    """Which slice of its input a slicing node's output ``position`` is: a Split's output
    position, a Gather's constant scalar index, a Slice's constant start; None for other nodes."""
    if node.op_type == "Split":
        return position
    if node.op_type == "Gather" and graph.is_constant(node.inputs[1]) and graph.constants[node.inputs[1]].size == 1:
        return int(graph.constants[node.inputs[1]].reshape(-1)[0])
    if node.op_type == "Slice" and len(node.inputs) > 1 and graph.is_constant(node.inputs[1]):
        starts = graph.constants[node.inputs[1]].reshape(-1)
        return int(starts[0]) if starts.size == 1 else None
    return None


def _commutes(graph: Graph, node: Node, members: dict[str, int], whole_heads: set[str]) -> bool:
    """Whether a node on the unit axis's way passes a per-head basis change through: data
    movement, a shape read, scalar scaling, a bias Add, a slice or a Concat along an axis other
    than the unit axis, a Split along it into parts that each hold whole heads (``whole_heads``: the
    tensors in which every unit has as many elements), a product of two activations, a 2-D
    MatMul or plain Gemm projection, a fused Attention (whose rule makes head dimensions its
    units only where it computes each head on its own)."""
    if node.op_type in _DATA_MOVEMENT or node.op_type == "Shape":
        return True
    if _scalar_scaling(graph, node) or _bias_add(graph, node, members) or _fused_attention(node):
        return True
    if node.op_type == "Split" and all(y in whole_heads for y in node.outputs):
        return node.inputs[0] in whole_heads
    if node.op_type in ("Slice", "Gather", "Split"):
        return node.inputs[0] in members and not _slices_unit_axis(graph, node, members[node.inputs[0]])
    if node.op_type == "Concat":  # a key/value cache joined along the sequence (every input rotated too)
        y = node.outputs[0]
        return y in members and all(x in members for x in node.inputs) \
            and int(node.attr("axis")) % len(graph.shapes[y]) != members[y]
    if node.op_type == "Gemm":
        return _matmul_weight(graph, node) is not None
    if node.op_type == "MatMul":
        return _matmul_weight(graph, node) is not None or not any(graph.is_constant(i) for i in node.inputs)
    return False


def _slices_unit_axis(graph: Graph, node: Node, unit_axis: int) -> bool:
    """Whether a Slice, Gather or Split cuts its input along ``unit_axis`` (or cannot be read)."""
    rank = len(graph.shapes[node.inputs[0]])
    if node.op_type in ("Gather", "Split"):
        return int(node.attr("axis", 0)) % rank == unit_axis
    if len(node.inputs) < 4 or not node.inputs[3]:
        return True  # every axis sliced
    if not graph.is_constant(node.inputs[3]):
        return True
    return any(int(a) % rank == unit_axis for a in graph.constants[node.inputs[3]].reshape(-1))


def _bias(graph: Graph, node: Node, members: dict[str, int]) -> str | None:
    readers = graph.consumers.get(node.outputs[0], [])
    if len(readers) == 1 and _bias_add(graph, readers[0], members):
        return next(name for name in readers[0].inputs if graph.is_constant(name))
    return None
