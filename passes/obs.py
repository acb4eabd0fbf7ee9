"""The second-order (Optimal Brain Surgeon) criterion: score channels by the output error their
removal causes once the remaining weights are compensated, and compensate them.

For a consumer layer ``Y = W X`` (``W``: ``[outputs, features]``, a Conv's features being its
im2col patch, plus a constant-1 feature carrying the bias) with input statistics ``H = Xᵀ X``
(damped: ``H + λ·mean(diag H)·I``), removing the block ``B`` of features of some input channels
and re-solving the remaining weights by least squares leaves the error

    cost(B) = Σ_rows W[r, B] ((H⁻¹)_BB)⁻¹ W[r, B]ᵀ

and the optimal update of every weight is

    W ← W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]

which zeroes ``W[:, B]``; it is the least-squares solution on the calibration activations, the
bias absorbing the mean contribution of the removed channels. A channel's score is its cost
summed over every consumer: squared output error in the consumers' own units, which compares
across groups as it is (``self_normalized``). Dividing each layer's costs by its output energy
``trace(W H Wᵀ)`` (``obs_relative``) was measured worse: digits ResNet at 0.3 of the FLOPs 0.856
test accuracy against 0.936, MiniLM at 0.5 sentence-embedding cosine 0.741 against 0.749
(``python -m models.obs_benchmark``). Channels are scored one at a time; compensation removes
all chosen channels of a layer jointly, which is exact for the joint removal.
"""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.calibrate import ConsumerLayer, LayerStatistics
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion
from spa_compiler.pipeline import Pass
from spa_compiler.state import PruneState

from .magnitude import L2Magnitude

__all__ = [
    "OBS", "OBSRelative", "OBSCompensation", "removal_costs", "compensated", "compensate_layer", "feature_columns",
    "DAMPING",
]

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


class OBSCompensation(Pass):
    """After allocation, re-fit every consumer layer that lost input channels:
    ``W ← W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]`` with the bias as the constant feature."""

    name, description = "compensate", "re-fitting the remaining weights (least squares)"
    requires, provides = ("analysis", "statistics", "removed_by_axis"), ("compensated",)

    def run(self, state: PruneState) -> PruneState:
        for stats in state.statistics.values():
            axis = state.analysis.axis_id(stats.layer.weight, stats.layer.axis)
            channels = state.removed_by_axis.get(axis)
            if channels is not None and len(channels):
                state.compensated.update(compensate_layer(stats, state.analysis.graph.constants, channels))
        return state


@register_criterion("obs")
class OBS(Criterion):
    description = "second-order output error after compensation (needs --calib, else data-free)"
    needs_statistics = True
    self_normalized = True
    fallback = L2Magnitude
    compensation = OBSCompensation
    relative = False  # divide each layer's costs by its output energy (the obs_relative ablation)

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        totals = np.zeros(len(group.units))
        by_axis = group.by_axis()
        for axis_id, stats in ctx.statistics_for(group):
            layer = stats.layer
            weights = augmented(layer, ctx.analysis.graph.constants)
            inverse = stats.inverse(DAMPING)
            energy = (float(np.sum((weights @ stats.hessian) * weights)) or 1.0) if self.relative else 1.0
            units, channels = by_axis[axis_id]
            costs = removal_costs(weights, inverse, channels, layer.features_per_channel)
            totals += np.bincount(units, weights=costs / energy, minlength=len(group.units))
        return totals


@register_criterion("obs_relative")
class OBSRelative(OBS):
    """Ablation: each layer's costs relative to its output energy ``trace(W H Wᵀ)``."""

    description = "obs with costs relative to each layer's output energy (ablation)"
    relative = True
