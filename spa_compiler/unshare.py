"""Every reader of a shared vector constant or Reshape target gets its own copy.

Exporters merge what holds the same values: the dynamo exporter's optimiser keeps one
``[1, T, -1, 16]`` for the reshape into heads of every layer (a constant, or a ``Concat`` of the
run-time batch and sequence sizes with ``[-1]`` and ``[16]`` when those are dynamic), and one zero
bias for every projection that has a zero bias (every LayerNorm's ones and zeros too, in a model
not trained yet). What several nodes read ties their axes together in the analysis: a shared
reshape target gives the queries, keys and values of every layer one head size, so their head
dimensions are one group that cannot be rotated; a shared bias makes every projection it serves
one channel group, and the residual stream's blocks then hold them all.

PyTorch's multi-layer recurrent layers start from one tensor of ``[layers * directions, batch,
hidden]`` zeros (a ``ConstantOfShape``, or with the dynamo exporter an ``Expand`` of a constant
0) that every layer slices its states from: read as it is, every layer would lose the same
hidden units.

Copies change nothing the model computes, so :func:`unshare` gives, before the analysis, every
reader of such a *fill* (one value everywhere) read by an earlier one its own copy of it; every
Reshape and fill whose shape a ``Concat`` shared with an earlier one computes its own copy of
that ``Concat`` (its other inputs still shared); and then every node input that reads a 1-D
initializer shared with an earlier one its own copy; copies are named ``<name>.<k>``. Only
vectors and fills are copied: a shared matrix is a tied weight (an embedding read by the output
projection, ALBERT's layers), which its readers must keep tied, and large; but a matrix of one
value is a fill the exporter folded (RWKV's dynamo export writes all five recurrent states of
every layer into one ``[batch, hidden, layers]`` initializer of zeros, which would tie the
residual stream to every layer's attention channels). The copy of a vector kept on disk (a
streamed model's) refers to the same bytes. Names read inside a control-flow
subgraph and graph outputs are left shared.

After the rewrite, :func:`share_identical` makes matrices that hold the same values one again:
the weights that constant folding computed once per reader (an LSTM's gate-reordered weights,
computed from one shared weight in both branches of an If, would otherwise be written twice).
Vectors and scalars stay as they are (a quantized model keeps a zero point per tensor).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .proto_copy import keep_initializers
from .subgraphs import defined_names, subgraphs_of, walk_nodes

__all__ = ["unshare", "share_identical"]


def unshare(model: onnx.ModelProto) -> int:
    """Give each reader of a fill in ``model``'s main graph its own copy, each Reshape and fill
    its own shape ``Concat`` and each reader of a shared 1-D initializer its own copy (see the
    module docstring), in place; the number of copies made."""
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {
        o for node in graph.node for o in node.output
    } | {node.name for node in graph.node}
    small = {t.name: t for t in graph.initializer if np.prod(t.dims) <= 64}
    copied = _own_copies(graph, taken, lambda node: _is_fill(node, small), lambda node: range(len(node.input)))
    targets = _own_copies(graph, taken, lambda node: node.op_type == "Concat", lambda node: _shape_slot(node, small))
    return copied + targets + _own_vectors(graph, taken)


def _is_fill(node: onnx.NodeProto, small: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` writes one value everywhere: a ConstantOfShape, or an Expand of one of
    the ``small`` constants whose elements are all equal (the dynamo exporter's ``zeros``)."""
    if node.op_type == "ConstantOfShape":
        return True
    if node.op_type != "Expand" or node.input[0] not in small:
        return False
    value = numpy_helper.to_array(small[node.input[0]])
    return bool(value.size) and bool((value == value.flat[0]).all())


def _shape_slot(node: onnx.NodeProto, small: dict[str, onnx.TensorProto]) -> list[int]:
    """The input of ``node`` that is a shape it writes its output to: a Reshape's target, a
    fill's shape (:func:`_is_fill`)."""
    if node.op_type == "Reshape":
        return [1]
    if _is_fill(node, small):
        return [0] if node.op_type == "ConstantOfShape" else [1]
    return []


def _own_copies(graph: onnx.GraphProto, taken: set[str], copied: Callable[[onnx.NodeProto], bool],
                slots: Callable[[onnx.NodeProto], Iterable[int]]) -> int:
    """Copy the single-output node that ``copied`` selects when an earlier reader reads what it
    computes too, for each later reader: the readers are the inputs at ``slots(node)``. Each
    copy comes right after its original. The number of copies."""
    producers = {node.output[0]: node for node in graph.node if len(node.output) == 1 and copied(node)}
    copies: dict[str, list[onnx.NodeProto]] = {}
    for node, slot, name in _later_reads(graph, producers, slots):
        copy = onnx.NodeProto()
        copy.CopyFrom(producers[name])
        copy.name = _fresh(copy.name or copy.op_type, taken)
        copy.output[0] = _fresh(name, taken)
        node.input[slot] = copy.output[0]
        copies.setdefault(name, []).append(copy)
    if copies:
        ordered = []
        for node in graph.node:
            ordered.append(onnx.NodeProto.FromString(node.SerializeToString()))
            if node.output and node.output[0] in copies:
                ordered.extend(copies[node.output[0]])
        del graph.node[:]
        graph.node.extend(ordered)
    return sum(len(c) for c in copies.values())


def _own_vectors(graph: onnx.GraphProto, taken: set[str]) -> int:
    """Give each reader of a shared 1-D initializer, or of a shared initializer that holds one
    value everywhere (a fill the exporter folded), its own copy; the number of copies."""
    reads = Counter(name for node in graph.node for name in node.input)
    vectors = {t.name: t for t in graph.initializer
               if len(t.dims) == 1 or (len(t.dims) > 1 and reads[t.name] > 1 and _holds_one_value(t))}
    copies = []
    for node, slot, name in _later_reads(graph, vectors, lambda node: range(len(node.input))):
        copy = onnx.TensorProto()
        copy.CopyFrom(vectors[name])
        copy.name = _fresh(name, taken)
        copies.append(copy)
        node.input[slot] = copy.name
    graph.initializer.extend(copies)
    return len(copies)


def _holds_one_value(tensor: onnx.TensorProto) -> bool:
    """Whether the initializer ``tensor`` (not one kept on disk) holds one value everywhere."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    value = numpy_helper.to_array(tensor)
    return bool(value.size) and bool((value == value.flat[0]).all())


def _later_reads(graph: onnx.GraphProto, names: Collection[str],
                 slots: Callable[[onnx.NodeProto], Iterable[int]]) -> Iterator[tuple[onnx.NodeProto, int, str]]:
    """``(node, slot, name)`` for every read of one of ``names`` at the inputs ``slots(node)`` of
    the main graph's nodes after its first, in node order. Names that are graph outputs or are
    read inside a subgraph stay shared and are left out."""
    kept = {o.name for o in graph.output} | {
        name for node in graph.node for sub in subgraphs_of(node) for inner in walk_nodes(sub) for name in inner.input
    }
    read: set[str] = set()
    for node in graph.node:
        for slot in (k for k in slots(node) if k < len(node.input)):
            name = node.input[slot]
            if name not in names or name in kept:
                continue
            if name in read:
                yield node, slot, name
            else:
                read.add(name)


def share_identical(model: onnx.ModelProto) -> int:
    """Point every reader of a main-graph initializer of two or more dimensions at the first one
    holding the same type, shape and values, and drop the others, in place; the number dropped.
    Initializers that are graph inputs or outputs, kept on disk, or named again inside a subgraph
    (which would shadow them there) stay as they are."""
    graph = model.graph
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output} | {
        name for node in graph.node for sub in subgraphs_of(node) for name in defined_names(sub)}
    alike: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for tensor in graph.initializer:
        if len(tensor.dims) >= 2 and tensor.name not in fixed and tensor.data_location != onnx.TensorProto.EXTERNAL:
            alike[(tensor.data_type, tuple(tensor.dims))].append(tensor)
    first: dict[str, str] = {}
    for tensors in alike.values():
        if len(tensors) < 2:
            continue
        seen: dict[bytes, str] = {}
        for tensor in tensors:
            digest = hashlib.blake2b(numpy_helper.to_array(tensor).tobytes()).digest()
            if digest in seen:
                first[tensor.name] = seen[digest]
            else:
                seen[digest] = tensor.name
    if first:
        for node in walk_nodes(graph):
            for slot, name in enumerate(node.input):
                if name in first:
                    node.input[slot] = first[name]
        keep_initializers(graph, {t.name for t in graph.initializer if t.name not in first})
    return len(first)


def _fresh(name: str, taken: set[str]) -> str:
    """``<name>.<k>`` for the smallest ``k >= 1`` not in ``taken``, which it joins."""
    k = 1
    while f"{name}.{k}" in taken:
        k += 1
    taken.add(f"{name}.{k}")
    return f"{name}.{k}"
