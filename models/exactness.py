"""The exactness check of DESIGN invariant 3, shared by the test suite and ``models.fuzz``.

Channels whose outgoing effect is zero can be removed without changing any output. To make a
chosen set of channels have no effect, every weight slab that *reads* them (the Conv, Gemm and
MatMul input slices op rules tag ``"consumer"``) is set to zero; the pruned model must then
reproduce the zeroed model's outputs, and any wrong index map, stale attribute or mis-sliced
constant shows up as a difference.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from spa_compiler import Analysis, Graph

__all__ = ["set_constant", "zero_readers", "relative_error"]


def set_constant(graph: Graph, name: str, value: np.ndarray) -> None:
    """Replace a constant both in the analysis view and in the model proto."""
    graph.constants[name] = value
    for tensor in graph.model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value, name))


def zero_readers(graph: Graph, analysis: Analysis, removed_by_axis: dict[int, np.ndarray]) -> list[str]:
    """Zero the slabs of every consumer weight axis that read the removed indices
    (``removed_by_axis``: axis id of ``analysis`` -> indices), each weight once, in ``graph``'s
    constants and model. Returns the names of the weights changed."""
    consumer_axes = set(analysis.tags.get("consumer", []))
    zeroed: dict[str, np.ndarray] = {}
    for axis_id, indices in removed_by_axis.items():
        if axis_id in consumer_axes:
            ref = analysis.axes[axis_id]
            value = zeroed.setdefault(ref.tensor, graph.constants[ref.tensor].copy())
            np.moveaxis(value, ref.axis, 0)[indices] = 0
    for name, value in zeroed.items():
        set_constant(graph, name, value)
    return sorted(zeroed)


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Relative L2 error of all outputs together: ``|a - b| / |a|``."""
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in expected])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in actual])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
