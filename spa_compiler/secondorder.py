"""Second-order (Optimal Brain Surgeon) maths for one layer: removal costs and compensation.

For a consumer layer ``Y = W X`` (``W``: ``[outputs, features]``, a Conv's features being its
im2col patch, plus a constant-1 feature carrying the bias) with input statistics ``H = Xᵀ X``
(damped: ``H + λ·mean(diag H)·I``), removing the block ``B`` of features of some input channels
and re-solving the remaining weights by least squares leaves the error

    cost(B) = Σ_rows W[r, B] ((H⁻¹)_BB)⁻¹ W[r, B]ᵀ

and the optimal update of every weight is

    W ← W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]

which zeroes ``W[:, B]``; it is the least-squares solution on the calibration activations, the
bias absorbing the mean contribution of the removed channels.
"""

from __future__ import annotations

import numpy as np

from .calibrate import ConsumerLayer, LayerStatistics

__all__ = ["DAMPING", "feature_columns", "removal_costs", "compensated", "augmented", "compensate_layer"]

DAMPING = 0.01


def feature_columns(channels: np.ndarray, per_channel: int) -> np.ndarray:
    """Feature columns of input channels: channel c owns ``c*k .. c*k + k - 1``."""
    return (np.asarray(channels)[:, None] * per_channel + np.arange(per_channel)).reshape(-1)


def removal_costs(weights: np.ndarray, inverse: np.ndarray, channels: np.ndarray, per_channel: int) -> np.ndarray:
    """``cost(B_c)`` for each channel c alone, vectorised over channels (blocks of k features)."""
    columns = feature_columns(channels, per_channel).reshape(len(channels), per_channel)
    blocks = inverse[columns[:, :, None], columns[:, None, :]]  # [channels, k, k]
    slabs = np.moveaxis(weights[:, columns], 1, 0)  # [channels, rows, k]
    solved = np.linalg.solve(blocks, np.swapaxes(slabs, 1, 2))  # [channels, k, rows]
    return np.einsum("crk,ckr->c", slabs, solved)


def compensated(weights: np.ndarray, inverse: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]`` for the removed feature columns B."""
    block = inverse[np.ix_(columns, columns)]
    return weights - weights[:, columns] @ np.linalg.solve(block, inverse[columns, :])


def augmented(layer: ConsumerLayer, constants: dict[str, np.ndarray]) -> np.ndarray:
    """The layer's ``[rows, features + 1]`` matrix, its bias (or zeros) last; with channel
    statistics each output's bias is shared evenly by its kernel positions' rows."""
    matrix = layer.matrix(constants[layer.weight]).astype(np.float64)
    k = layer.rows_per_output
    bias = np.repeat(constants[layer.bias].reshape(-1).astype(np.float64) / k, k) if layer.bias else np.zeros(len(matrix))
    return np.hstack([matrix, bias[:, None]])


def compensate_layer(stats: LayerStatistics, constants: dict[str, np.ndarray], channels: np.ndarray) -> dict[str, np.ndarray]:
    """New values of the layer's weight (and bias) once its input ``channels`` are removed,
    at the original shapes (the removed columns become zero)."""
    layer = stats.layer
    weights = augmented(layer, constants)
    columns = feature_columns(channels, layer.features_per_channel)
    inverse = stats.inverse(DAMPING, with_bias=layer.bias is not None)
    result = compensated(weights if layer.bias else weights[:, :-1], inverse, columns)
    updates = {layer.weight: layer.from_matrix(result[:, : weights.shape[1] - 1], constants[layer.weight])}
    if layer.bias:
        bias = constants[layer.bias]
        updates[layer.bias] = (
            result[:, -1].reshape(-1, layer.rows_per_output).sum(axis=1).reshape(bias.shape).astype(bias.dtype)
        )
    return updates
