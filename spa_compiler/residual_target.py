"""Re-fit targets that carry the residual stream's error.

A layer whose output ``y`` (its bias added) is added to a residual stream ``r`` feeds the
block's output ``s = r + y``. In the pruned network the stream ``r̃`` already differs from the
original ``r`` by what every pruned layer before it changed; a re-fit that matches the layer's
original output (``ỹ ≈ y``) leaves ``s̃ − s = r̃ − r`` and passes that error on. Fitting
instead toward

    ỹ ≈ y + δ,   δ = r − r̃

makes ``s̃ ≈ s`` as far as the layer's inputs can predict ``δ``: each residual block takes up
the error of the blocks before it (its bias alone removes the error's mean). As a linear
target this is ``[W, I] [x; δ]``: the original input features ``x`` extended by ``δ`` at the
same rows (tokens), the original weights ``W`` extended by the identity
(:func:`extended_target`); the least-squares re-fit (:mod:`spa_compiler.refit`) is otherwise
the same, and its held-out choice of ridge measures the error toward this target.

Only layers whose outputs lie along the last axis (MatMul, Gemm: one row per token or sample,
one output per weight row), added to the stream by an Add or a fused Add + LayerNorm
(onnxruntime's ``SkipLayerNormalization``), take such a target, and only where the stream
keeps its width after pruning (a transformer's hidden size, blocked by its LayerNorms);
elsewhere ``δ`` is zero and the target is the plain one. On the calibration rows the fit can
only lower the block's error; the held-out choice keeps it from fitting noise.
"""

from __future__ import annotations

import numpy as np

from .calibrate import ConsumerLayer, layer_output
from .ir import Graph

__all__ = ["residual_stream", "residual_rows", "extended_target", "SUMS"]

SUMS = {"Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
"""Ops whose first two inputs are summed: a residual Add, and onnxruntime's fusions of that Add
with the LayerNorm (or RMSNorm) after it."""


def residual_stream(graph: Graph, layer: ConsumerLayer) -> str | None:
    """The tensor ``r`` that the layer's output (after its bias) is added to, when that sum
    (:data:`SUMS`) is the output's only reader, ``r`` is no constant and both have one shape
    (the sum's: no broadcasting); else None. The output must be ``W x`` itself, one value per
    weight row along its last axis (a recurrent layer's is not: its rows are gates)."""
    node = graph.node_by_name[layer.node]
    output = layer_output(graph, node)
    weight = graph.constants[layer.weight]
    weight_rows = weight.size // weight.shape[layer.axis]
    if layer.channel_axis != -1 or layer.rows_per_output != 1 or graph.shapes.get(output, (0,))[-1] != weight_rows:
        return None
    readers = graph.consumers.get(output, [])
    if len(readers) == 1 and readers[0].op_type == "Add" and layer.bias in readers[0].inputs:  # the bias first
        output = readers[0].outputs[0]
        readers = graph.consumers.get(output, [])
    if len(readers) != 1 or readers[0].op_type not in SUMS or output in graph.outputs:
        return None
    others = [name for name in readers[0].inputs[:2] if name != output]
    if len(others) != 1 or not others[0] or graph.is_constant(others[0]):
        return None
    shapes = {graph.shapes.get(name) for name in (output, others[0])}
    return others[0] if len(shapes) == 1 and None not in shapes else None


def residual_rows(value: np.ndarray, rows: np.ndarray | None, leading: tuple[int, ...]) -> np.ndarray:
    """The stream's values at a layer's feature rows: ``[rows, width]`` (outputs last), the
    layer's output having the leading axes ``leading``. A stream that the sum broadcasts (position
    embeddings computed once for a whole batch, where an export computes the positions at run
    time) is broadcast to them first, as the sum does."""
    flat = np.broadcast_to(value, (*leading, value.shape[-1])).reshape(-1, value.shape[-1])
    return flat if rows is None else flat[rows]


def extended_target(weights: np.ndarray, residual: int) -> np.ndarray:
    """The augmented weights ``[W, b]`` (bias last) extended to ``[W, I, b]`` for ``residual``
    columns of ``δ`` (``residual`` is the number of outputs, or 0: ``weights`` as they are)."""
    if not residual:
        return weights
    return np.hstack([weights[:, :-1], np.eye(len(weights), residual), weights[:, -1:]])
