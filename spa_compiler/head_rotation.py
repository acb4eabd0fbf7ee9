"""A basis for each attention head in which its last dimensions carry the least.

Pruning head dimensions (``--head-dims``) removes position d of every head. Any invertible
``T`` per head leaves the model's function as it is: queries and keys give the same scores,
``(q T)(k T⁻ᵀ)ᵀ = q kᵀ``, and values the same output, ``(P v T)(T⁻¹ W_O) = P v W_O``. This pass
chooses, on the calibration (or synthetic) data, the ``T`` in which removing the last
dimensions of a head is the best truncation of its rank, so that head dimensions can be pruned
as cheaply as the head's spectrum allows (unrotated, a head's dimensions are all alike).

Queries and keys. With the second moment of one head's queries ``C_q = E[qᵀq]`` and the
covariance of its keys ``C_k = E[kᵀk] − E[k]ᵀE[k]`` (from the projections' input statistics:
``E[qᵀq] = [W; b]ᵀ E[x̃ᵀx̃] [W; b]``; a key component shared by every key adds the same number to
a query's whole row of scores, which the softmax ignores), their Cholesky factors
``C = L Lᵀ`` and the SVD ``L_qᵀ L_k = U S Vᵀ``, the pair ``A = L_q⁻ᵀ U S^½`` (queries) and
``B = L_k⁻ᵀ V S^½`` (keys) satisfies ``A Bᵀ = I``, and the new queries' second moment and the new
keys' covariance are both ``S``: with q and k independent, dimension d contributes ``s_d²`` to
``E‖q (k − E[k])ᵀ‖²``, and dropping the last ones is the best truncation in that sense
(Eckart–Young on ``L_qᵀ L_k``).

Values and output projection. With the second moment ``C_z = E[zᵀz] = L Lᵀ`` of the head's
attention output ``z = P v`` (the output projection's input statistics) and the SVD
``Lᵀ W_O = U S Vᵀ`` of the head's rows of ``W_O``: ``T = L⁻ᵀ U`` makes the new ``z`` white and the
new rows ``T⁻¹ W_O = S Vᵀ``; dimension d contributes ``s_d²`` to the head's output energy.

Only attention whose head dimensions travel from the projections to the products through
data movement and scalar scaling (Reshape, Transpose, Mul or Div by a scalar) is rotated: a
rotary embedding or a per-dimension norm on the way does not commute with ``T``, and those
heads keep their basis. The rotation is exact up to float32 rounding; the verification that
ends every pruning measures it with everything else.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, replace

import numpy as np
from onnx import numpy_helper

from .analysis import Analysis, Group
from .calibrate import ConsumerLayer, LayerStatistics, collect_statistics
from .ir import Graph, Node
from .pipeline import Pass
from .proto_copy import copy_without_initializers
from .state import PruneState
from .verify import fidelity, reference_session

__all__ = [
    "GroupRotation", "HeadBasis", "HeadRotation", "RotateHeads", "query_key_bases", "rotatable_heads", "rotate_heads", "rotated_graph",
    "value_output_bases",
]

TOLERANCE = 1e-3
"""Relative output error a rotation may cause (float32 rounding of the new weights: 8e-7 on
all-MiniLM-L6-v2); more means the graph was not what the analysis took it for."""
CHECK_SAMPLES = 4  # calibration samples the check runs

RIDGE = 1e-6
"""Added to each second moment (times its mean diagonal) so that its Cholesky factor exists;
the bases stay exact inverses of each other whatever it is."""

_DATA_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class HeadBasis:
    """One attention group's weights in per-head index form: ``heads[h, k]`` is the index of head
    h's element in unit k, on every constant axis of the group (their layouts agree)."""

    group: Group
    heads: np.ndarray
    query_key: tuple[ConsumerLayer, ConsumerLayer] | None  # the projections of queries and keys
    value_output: tuple[ConsumerLayer, ConsumerLayer] | None  # the projections of values and of the output

    @property
    def measured(self) -> list[ConsumerLayer]:
        """The layers whose input statistics the rotation reads: the query and key projections,
        and the output projection (whose input is the attention output)."""
        return [*(self.query_key or ()), *(self.value_output[1:] if self.value_output else ())]


def _unit_layout(group: Group, axis_id: int) -> np.ndarray | None:
    """``[heads, units]`` indices of one member axis, or None when the units do not all hold
    one index per head."""
    per_unit = [np.sort(unit.members.get(axis_id, np.empty(0, dtype=np.int64))) for unit in group.units]
    counts = {len(indices) for indices in per_unit}
    if len(counts) != 1 or 0 in counts:
        return None
    return np.stack(per_unit, axis=1)


def _matmul_weight(graph: Graph, node: Node) -> str | None:
    if node.op_type != "MatMul" or len(node.inputs) != 2 or node.scope:
        return None
    weight = node.inputs[1]
    return weight if graph.is_constant(weight) and graph.constants[weight].ndim == 2 else None


def _scalar_scaling(graph: Graph, node: Node) -> bool:
    if node.op_type not in ("Mul", "Div"):
        return False
    constants = [name for name in node.inputs if graph.is_constant(name)]
    return len(constants) == 1 and graph.constants[constants[0]].size == 1 and (
        node.op_type == "Mul" or node.inputs[1] == constants[0])


def _bias_add(graph: Graph, node: Node, members: set[str]) -> bool:
    constants = [name for name in node.inputs if graph.is_constant(name)]
    return node.op_type == "Add" and len(constants) == 1 and constants[0] in members


def rotatable_heads(analysis: Analysis) -> list[HeadBasis]:
    """The head-dimension groups whose every tensor is written and read by nodes that commute
    with a per-head basis change: 2-D MatMul projections into the unit axis (with a constant
    bias Add), data movement, scalar scaling, the products of two activations, and a 2-D MatMul
    reading the unit axis (the output projection); one query, one key projection, or one value
    and one output projection, or both (a group whose head-dim constant they share)."""
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
    members = {ref.tensor for ref in refs.values()}
    layouts = {axis_id: _unit_layout(group, axis_id) for axis_id, ref in refs.items() if ref.constant}
    if any(layout is None for layout in layouts.values()):
        return None
    heads = next(iter(layouts.values()))
    if any(not np.array_equal(layout, heads) for layout in layouts.values()):
        return None
    roles: dict[str, list[ConsumerLayer]] = {}
    for axis_id, ref in refs.items():
        if ref.constant:
            readers = graph.consumers.get(ref.tensor, [])
            if len(readers) != 1:
                return None
            reader = readers[0]
            if _matmul_weight(graph, reader) == ref.tensor:
                layer = ConsumerLayer(reader.name, reader.op_type, reader.inputs[0], ref.tensor, 0, 1,
                                      _bias(graph, reader, members))
                role = _role(graph, reader.name, members) if ref.axis == 1 else "output"
                roles.setdefault(str(role), []).append(layer)
            elif not _bias_add(graph, reader, members):
                return None
            continue
        node = graph.producer.get(ref.tensor)
        if node is None or not _commutes(graph, node, members):
            return None
        if not all(_commutes(graph, reader, members) for reader in graph.consumers.get(ref.tensor, [])):
            return None
    pairs = {first: (roles[first][0], roles[second][0]) for first, second in (("query", "key"), ("value", "output"))
             if len(roles.get(first, [])) == 1 and len(roles.get(second, [])) == 1}
    if not pairs or sum(len(layers) for layers in roles.values()) != 2 * len(pairs):
        return None
    return HeadBasis(group, heads, pairs.get("query"), pairs.get("value"))


def _role(graph: Graph, node_name: str, members: set[str]) -> str | None:
    """What a projection into the unit axis computes, from the product of two activations its
    output reaches through the group's tensors: "query" (operand 0 of a product that contracts
    the unit axis), "key" (operand 1), "value" (a product whose output keeps it); None if it
    reaches none or several."""
    roles, frontier, seen = set(), list(graph.node_by_name[node_name].outputs), set()
    while frontier:
        name = frontier.pop()
        seen.add(name)
        for reader in graph.consumers.get(name, []):
            if reader.op_type == "MatMul" and not any(graph.is_constant(i) for i in reader.inputs):
                roles.add("value" if reader.outputs[0] in members else ("query", "key")[reader.inputs.index(name)])
            else:
                frontier += [out for out in reader.outputs if out in members and out not in seen]
    return roles.pop() if len(roles) == 1 else None


def _commutes(graph: Graph, node: Node, members: set[str]) -> bool:
    """Whether a node on the unit axis's way passes a per-head basis change through."""
    if node.op_type in _DATA_MOVEMENT or _scalar_scaling(graph, node) or _bias_add(graph, node, members):
        return True
    if node.op_type == "MatMul":
        return _matmul_weight(graph, node) is not None or not any(graph.is_constant(i) for i in node.inputs)
    return False


def _bias(graph: Graph, node: Node, members: set[str]) -> str | None:
    readers = graph.consumers.get(node.outputs[0], [])
    if len(readers) == 1 and _bias_add(graph, readers[0], members):
        return next(name for name in readers[0].inputs if graph.is_constant(name))
    return None


def _augmented(graph: Graph, layer: ConsumerLayer) -> np.ndarray:
    """``[W; b]``: the projection's weight with its bias (zeros without one) as the last row."""
    weight = graph.constants[layer.weight].astype(np.float64)
    bias = graph.constants[layer.bias].astype(np.float64) if layer.bias else np.zeros(weight.shape[1])
    return np.vstack([weight, bias[None, :]])


def _moment(gram: np.ndarray, rows: int) -> np.ndarray:
    return gram / max(rows, 1)


def _cholesky(moment: np.ndarray) -> np.ndarray:
    scale = float(np.mean(np.diag(moment))) or 1.0
    return np.linalg.cholesky(moment + RIDGE * scale * np.eye(len(moment)))


def query_key_bases(c_query: np.ndarray, c_key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, s)`` for one head with query moment ``C_q`` and key covariance ``C_k``:
    ``A Bᵀ = I``, ``Aᵀ C_q A = Bᵀ C_k B = diag(s)`` (up to the ridge), ``s`` decreasing."""
    l_query, l_key = _cholesky(c_query), _cholesky(c_key)
    u, s, vt = np.linalg.svd(l_query.T @ l_key)
    root = np.sqrt(s)
    a = np.linalg.solve(l_query.T, u) * root
    b = np.linalg.solve(l_key.T, vt.T) * root
    return a, b, s


def value_output_bases(c_output: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(T, T⁻¹, s)`` for one head with attention-output moment ``C_z`` and output-projection
    rows ``W_O``: ``Tᵀ C_z T = I`` (up to the ridge), ``T⁻¹ W_O = diag(s) Vᵀ``, ``s`` decreasing."""
    lower = _cholesky(c_output)
    u, s, _ = np.linalg.svd(lower.T @ rows, full_matrices=False)
    return np.linalg.solve(lower.T, u), u.T @ lower.T, s


@dataclass(frozen=True)
class GroupRotation:
    """One group's rotation: the new values of its constants, each unit's share of what the
    heads carry in the new basis (``Σ_h s_{h,k}² / Σ_{h,k} s_{h,k}²``, decreasing; summed over
    queries/keys and values/output when both are in the group), and the change ``T̃`` of the
    output projection's input features (block-diagonal, the constant feature last)."""

    basis: HeadBasis
    values: dict[str, np.ndarray]
    energy: np.ndarray
    feature_change: np.ndarray | None

    def apply_to(self, statistics: dict[str, LayerStatistics]) -> None:
        """Bring the output projection's statistics to the new basis: ``H ← T̃ᵀ H T̃``."""
        if self.feature_change is not None and self.basis.value_output[1].node in statistics:
            stats = statistics[self.basis.value_output[1].node]
            stats.hessian = self.feature_change.T @ np.asarray(stats.hessian) @ self.feature_change
            stats.__dict__.pop("_inverses", None)


def rotate_heads(graph: Graph, bases: list[HeadBasis], data: dict[str, np.ndarray],
                 statistics: dict[str, LayerStatistics], batch_size: int = 16, seed: int = 0) -> list[GroupRotation]:
    """The rotation of every group in ``bases``, from ``statistics`` (or, for layers it lacks,
    statistics collected over ``data``); nothing is changed yet."""
    wanted = [layer for basis in bases for layer in basis.measured if layer.node not in statistics]
    moments = {**statistics, **(collect_statistics(graph, wanted, data, batch_size, seed=seed) if wanted else {})}
    rotations = []
    for basis in bases:
        values: dict[str, np.ndarray] = {}
        shares, change = [], None
        if basis.query_key:
            shares.append(_rotate_query_key(graph, basis.heads, basis.query_key, moments, values))
        if basis.value_output:
            share, change = _rotate_value_output(graph, basis.heads, basis.value_output, moments, values)
            shares.append(share)
        rotations.append(GroupRotation(basis, values, sum(share / (share.sum() or 1.0) for share in shares), change))
    return rotations


def _rotate_query_key(graph: Graph, heads: np.ndarray, layers: tuple[ConsumerLayer, ConsumerLayer],
                      moments: dict[str, LayerStatistics], values: dict[str, np.ndarray]) -> np.ndarray:
    weights = [_augmented(graph, layer) for layer in layers]
    grams = [_moment(moments[layer.node].hessian, moments[layer.node].rows) for layer in layers]
    energy = np.zeros(heads.shape[1])
    for columns in heads:
        c_query, c_key = (w[:, columns].T @ g @ w[:, columns] for w, g in zip(weights, grams))
        mean_key = grams[1][-1] @ weights[1][:, columns]  # the Gram's constant row holds the input means
        a, b, s = query_key_bases(c_query, c_key - np.outer(mean_key, mean_key))
        weights[0][:, columns] = weights[0][:, columns] @ a
        weights[1][:, columns] = weights[1][:, columns] @ b
        energy += s**2
    for layer, augmented in zip(layers, weights):
        _store(graph, layer, augmented, values)
    return energy


def _rotate_value_output(graph: Graph, heads: np.ndarray, layers: tuple[ConsumerLayer, ConsumerLayer],
                         moments: dict[str, LayerStatistics],
                         values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    value, output = layers
    augmented = _augmented(graph, value)
    rows = graph.constants[output.weight].astype(np.float64)
    stats = moments[output.node]
    gram = _moment(stats.hessian, stats.rows)
    change = np.eye(len(gram))
    energy = np.zeros(heads.shape[1])
    for columns in heads:
        forward, backward, s = value_output_bases(gram[np.ix_(columns, columns)], rows[columns])
        augmented[:, columns] = augmented[:, columns] @ forward
        rows[columns] = backward @ rows[columns]
        change[np.ix_(columns, columns)] = forward
        energy += s**2
    _store(graph, value, augmented, values)
    values[output.weight] = rows.astype(graph.constants[output.weight].dtype)
    return energy, change


def _store(graph: Graph, layer: ConsumerLayer, augmented: np.ndarray, values: dict[str, np.ndarray]) -> None:
    values[layer.weight] = augmented[:-1].astype(graph.constants[layer.weight].dtype)
    if layer.bias:
        values[layer.bias] = augmented[-1].astype(graph.constants[layer.bias].dtype)


def rotated_graph(graph: Graph, values: dict[str, np.ndarray]) -> Graph:
    """``graph`` with the constants ``values`` replaced, in a new model (``graph`` is left as it
    is; the other initializers are shared, not copied)."""
    model = copy_without_initializers(graph.model, set(values))
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    return replace(graph, model=model, constants=ChainMap(values, graph.constants))


@dataclass(frozen=True)
class HeadRotation:
    """What :class:`RotateHeads` did: the graph before (fidelity is measured against it), each
    rotated group's unit energies, and, per rotated query/key group, the constant axes whose
    zeroing removes its units exactly (it has no consumer weight to zero)."""

    original: Graph
    energies: dict[int, np.ndarray]
    zeroable: dict[int, list[int]]
    dropped: int = 0  # groups whose rotation did not keep the outputs
    error: float = 0.0  # the largest relative output error a rotation checked gave


class RotateHeads(Pass):
    """Give every rotatable attention head the basis of the module docstring before scoring.
    A rotation that does not keep the model's outputs on the first calibration samples (within
    ``TOLERANCE``, relative) is dropped, group by group, and the report says so."""

    name, description = "rotate", "rotating attention heads"
    requires = ("graph", "analysis", "statistics", "calibration_data")
    provides = ("graph", "analysis", "rotation")

    def run(self, state: PruneState) -> PruneState:
        bases = rotatable_heads(state.analysis) if state.calibration_data else []
        rotations = rotate_heads(state.graph, bases, state.calibration_data, state.statistics,
                                 state.config.calibration_batch, state.config.seed) if bases else []
        kept, error = self._exact(state.graph, rotations, state.calibration_data)
        for rotation in kept:
            rotation.apply_to(state.statistics)
        axis_id = state.analysis.axis_id
        zeroable = {r.basis.group.id: [axis_id(layer.weight, 1) for layer in r.basis.query_key]
                    + [axis_id(layer.bias, 0) for layer in r.basis.query_key if layer.bias]
                    for r in kept if r.basis.query_key}
        state.rotation = HeadRotation(state.graph, {r.basis.group.id: r.energy for r in kept}, zeroable,
                                      len(rotations) - len(kept), error)
        if kept:
            state.graph = rotated_graph(state.graph, {k: v for r in kept for k, v in r.values.items()})
            state.analysis = replace(state.analysis, graph=state.graph)
        return state

    @staticmethod
    def _exact(graph: Graph, rotations: list[GroupRotation],
               data: dict[str, np.ndarray]) -> tuple[list[GroupRotation], float]:
        """The rotations that keep the outputs (all of them when together they do, else each
        checked alone), and the largest relative error seen."""
        if not rotations:
            return [], 0.0
        samples = [{name: array[i:i + 1] for name, array in data.items()}
                   for i in range(min(CHECK_SAMPLES, len(next(iter(data.values())))))]

        def outputs(model: Graph) -> list[np.ndarray]:
            session, weights = reference_session(model)
            return [output for feeds in samples for output in session.run(None, {**feeds, **weights})]

        reference = outputs(graph)

        def error(chosen: list[GroupRotation]) -> float:
            values = {k: v for r in chosen for k, v in r.values.items()}
            return fidelity(reference, outputs(rotated_graph(graph, values))).relative_error

        together = error(rotations)
        if together <= TOLERANCE:
            return rotations, together
        alone = [error([r]) for r in rotations]
        return [r for r, e in zip(rotations, alone) if e <= TOLERANCE], max(together, *alone)
