"""The exactness check of DESIGN invariant 3, shared by the test suite and ``models.fuzz``.

Channels whose outgoing effect is zero can be removed without changing any output. To make a
chosen set of channels have no effect, every weight slab that *reads* them (the Conv, Gemm and
MatMul input slices op rules tag ``"consumer"``) is set to zero; the pruned model must then
reproduce the zeroed model's outputs, and any wrong index map, stale attribute or mis-sliced
constant shows up as a difference.

A channel contracted in a product of two activations (Q·Kᵀ over the dimensions of a single
head) is read by no weight; :func:`zero_contracted` zeroes it at its source instead.
"""

from __future__ import annotations

import numpy as np

from spa_compiler import Analysis, Graph

__all__ = ["zero_readers", "zero_contracted", "relative_error"]


def _zero_slabs(graph: Graph, analysis: Analysis, slabs: dict[int, np.ndarray]) -> list[str]:
    """Zero the given indices of the given constant axes (axis id -> indices), each constant
    once; returns the names of the constants changed."""
    zeroed: dict[str, np.ndarray] = {}
    for axis_id, indices in slabs.items():
        ref = analysis.axes[axis_id]
        value = zeroed.setdefault(ref.tensor, graph.constants[ref.tensor].copy())
        np.moveaxis(value, ref.axis, 0)[indices] = 0
    for name, value in zeroed.items():
        graph.set_constant(name, value)
    return sorted(zeroed)


def zero_readers(graph: Graph, analysis: Analysis, removed_by_axis: dict[int, np.ndarray]) -> list[str]:
    """Zero the slabs of every consumer weight axis that read the removed indices
    (``removed_by_axis``: axis id of ``analysis`` -> indices), each weight once, in ``graph``'s
    constants and model. Returns the names of the weights changed."""
    consumer_axes = set(analysis.tags.get("consumer", []))
    return _zero_slabs(graph, analysis, {a: i for a, i in removed_by_axis.items() if a in consumer_axes})


def zero_contracted(graph: Graph, analysis: Analysis, removed: dict[int, list[int]]) -> list[str]:
    """For the removed units (group id -> unit indices) that a MatMul of two activations
    contracts, zero their source: their slabs of the weight output axes (roots) and of the
    constants added to them (biases). A projection ``x @ W + b`` followed by Reshape and
    Transpose then delivers exact zeros to the product. Returns the names of the constants changed."""
    model = analysis.graph
    contracted: set[int] = set()
    biases: set[str] = set()
    for node in model.nodes:
        constant = [model.is_constant(i) for i in node.inputs]
        if node.op_type == "MatMul" and not any(constant):
            a, b = node.inputs
            contracted |= {analysis.axis_id(a, model.rank(a) - 1), analysis.axis_id(b, max(model.rank(b) - 2, 0))}
        elif node.op_type == "Add":
            biases |= {i for i, c in zip(node.inputs, constant) if c}
    sources = (set(analysis.tags.get("weight", [])) - set(analysis.tags.get("consumer", []))) | {
        k for k, ref in enumerate(analysis.axes) if ref.tensor in biases
    }
    slabs: dict[int, list[np.ndarray]] = {}
    groups = {g.id: g for g in analysis.groups}
    for gid, units in removed.items():
        for unit in (groups[gid].units[k] for k in units):
            if contracted.intersection(unit.members):
                for axis_id in sources.intersection(unit.members):
                    slabs.setdefault(axis_id, []).append(unit.members[axis_id])
    return _zero_slabs(graph, analysis, {a: np.concatenate(parts) for a, parts in slabs.items()})


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Relative L2 error of all outputs together: ``|a - b| / |a|``."""
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in expected])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in actual])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
