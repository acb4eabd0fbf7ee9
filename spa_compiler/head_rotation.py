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

Which heads can be rotated, and which projection plays which role, is
:mod:`spa_compiler.attention_heads`' (a rotary embedding or a per-dimension norm on the way does
not commute with ``T``: those heads keep their basis). Whatever the graph, :class:`RotateHeads`
keeps a rotation only if the model's outputs stay the same on calibration samples (float32
rounding).
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, replace

import numpy as np
from onnx import numpy_helper

from .attention_heads import HeadBasis, Projection, rotatable_heads
from .calibrate import ConsumerLayer, LayerStatistics, collect_statistics
from .ir import Graph
from .pipeline import Pass
from .proto_copy import copy_without_initializers
from .state import PruneState
from .sample_layout import model_feeds
from .verify import fidelity, reference_session

__all__ = [
    "GroupRotation", "HeadRotation", "RotateHeads", "query_key_bases", "rotate_heads", "rotated_graph",
    "value_output_bases",
]

TOLERANCE = 1e-3
"""Relative output error a rotation may cause (float32 rounding of the new weights: 8e-7 on
all-MiniLM-L6-v2); more means the graph was not what the analysis took it for."""
CHECK_SAMPLES = 4  # calibration samples the check runs

RIDGE = 1e-6
"""Added to each second moment (times its mean diagonal) so that its Cholesky factor exists;
the bases stay exact inverses of each other whatever it is."""

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
    ``A Bᵀ = I``, ``Aᵀ C_q A = Bᵀ C_k B = diag(s)`` (up to the ridge), ``s`` decreasing. A head
    whose queries or key covariance vanish (a trace that is not positive: zero, or below zero
    by rounding, as when every key is the same, a sequence of one token) gives every key the
    same score, which the softmax ignores: its dimensions carry nothing (``s = 0``) and keep
    their basis."""
    if not (np.trace(c_query) > 0 and np.trace(c_key) > 0):
        identity = np.eye(len(c_query))
        return identity, identity, np.zeros(len(c_query))
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
        output = self.basis.value_output[1].layer.node if self.basis.value_output else None
        if self.feature_change is not None and output in statistics:
            stats = statistics[output]
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
        arrays: dict[str, np.ndarray] = {}  # per weight, [W; b] (the output projection: W), rotated in place
        shares, change = [], None
        if basis.query_key:
            shares.append(_rotate_query_key(graph, basis.query_key, moments, arrays))
        if basis.value_output:
            share, change = _rotate_value_output(graph, basis.value_output, moments, arrays)
            shares.append(share)
        values = {}
        for part in [*(basis.query_key or ()), *(basis.value_output or ())]:
            _store(graph, part.layer, arrays[part.layer.weight], values)
        rotations.append(GroupRotation(basis, values, sum(share / (share.sum() or 1.0) for share in shares), change))
    return rotations


def _array(graph: Graph, layer: ConsumerLayer, arrays: dict[str, np.ndarray], augment: bool = True) -> np.ndarray:
    if layer.weight not in arrays:
        arrays[layer.weight] = _augmented(graph, layer) if augment else graph.constants[layer.weight].astype(np.float64)
    return arrays[layer.weight]


def _rotate_query_key(graph: Graph, parts: tuple[Projection, Projection], moments: dict[str, LayerStatistics],
                      arrays: dict[str, np.ndarray]) -> np.ndarray:
    weights = [_array(graph, part.layer, arrays) for part in parts]
    grams = [_moment(moments[part.layer.node].hessian, moments[part.layer.node].rows) for part in parts]
    energy = np.zeros(parts[0].heads.shape[1])
    for query_columns, key_columns in zip(parts[0].heads, parts[1].heads):
        query, key = weights[0][:, query_columns], weights[1][:, key_columns]
        mean_key = grams[1][-1] @ key  # the Gram's constant row holds the input means
        a, b, s = query_key_bases(query.T @ grams[0] @ query, key.T @ grams[1] @ key - np.outer(mean_key, mean_key))
        weights[0][:, query_columns] = query @ a
        weights[1][:, key_columns] = key @ b
        energy += s**2
    return energy


def _rotate_value_output(graph: Graph, parts: tuple[Projection, Projection], moments: dict[str, LayerStatistics],
                         arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    value, output = parts
    augmented = _array(graph, value.layer, arrays)
    rows = _array(graph, output.layer, arrays, augment=False)
    stats = moments[output.layer.node]
    gram = _moment(stats.hessian, stats.rows)
    change = np.eye(len(gram))
    energy = np.zeros(value.heads.shape[1])
    for value_columns, output_rows in zip(value.heads, output.heads):
        forward, backward, s = value_output_bases(gram[np.ix_(output_rows, output_rows)], rows[output_rows])
        augmented[:, value_columns] = augmented[:, value_columns] @ forward
        rows[output_rows] = backward @ rows[output_rows]
        change[np.ix_(output_rows, output_rows)] = forward
        energy += s**2
    return energy, change


def _store(graph: Graph, layer: ConsumerLayer, array: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """A rotated ``[W; b]`` (or, for the output projection, ``W``) as the layer's constants."""
    weight = graph.constants[layer.weight]
    values[layer.weight] = array[:len(weight)].astype(weight.dtype)
    if layer.bias and len(array) > len(weight):
        values[layer.bias] = array[-1].astype(graph.constants[layer.bias].dtype)


def rotated_graph(graph: Graph, values: dict[str, np.ndarray]) -> Graph:
    """``graph`` with the constants ``values`` replaced, in a new model (``graph`` is left as it
    is; the other initializers are shared, not copied)."""
    model = copy_without_initializers(graph.model, set(values))
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    return replace(graph, model=model, constants=ChainMap(values, graph.constants))


@dataclass(frozen=True)
class HeadRotation:
    """What :class:`RotateHeads` did: the graph before (fidelity is measured against it), each
    rotated group's unit energies, per rotated query/key group the constant axes whose zeroing
    removes its units exactly (it has no consumer weight to zero), and the constants rotated
    (the report lists them as changed, so that ``spa_compiler.torch.narrow`` carries them over)."""

    original: Graph
    energies: dict[int, np.ndarray]
    zeroable: dict[int, list[int]]
    rotated: frozenset[str] = frozenset()  # the constants given new values
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
        zeroable = {r.basis.group.id: sorted({axis_id(p.layer.weight, 1) for p in r.basis.query_key}
                                             | {axis_id(p.layer.bias, 0) for p in r.basis.query_key if p.layer.bias})
                    for r in kept if r.basis.query_key}
        rotated = frozenset(name for r in kept for name in r.values)
        state.rotation = HeadRotation(state.graph, {r.basis.group.id: r.energy for r in kept}, zeroable, rotated,
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
        samples = [model_feeds(graph, {name: array[i:i + 1] for name, array in data.items()})
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
