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

Channels chosen one at a time by ``cost`` ignore that two alike channels each look cheap while
the other stays to stand in for it. :func:`greedy_scores` chooses them jointly, as OBC and
ZipLM do: after removing ``B``, the weights are compensated and the inverse Hessian of the
remaining features is the Schur complement

    H⁻¹ ← H⁻¹ − (H⁻¹)[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]

(the inverse of ``H`` without B's rows and columns, B's own rows and columns now zero), so the
next costs are exact marginal costs given the channels already gone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .calibrate import ConsumerLayer, LayerStatistics

__all__ = [
    "DAMPING", "feature_columns", "removal_costs", "compensated", "augmented", "compensation_system", "compensate_layer", "Consumer",
    "greedy_scores", "GREEDY_STEPS", "GREEDY_SHARE", "GREEDY_MAX_FEATURES",
]

DAMPING = 0.01
GREEDY_STEPS = 64  # blocks a greedy removal takes (each removes the cheapest units left)
GREEDY_SHARE = 0.9  # of the candidates the greedy removal goes through; the rest keep their last costs
GREEDY_MAX_FEATURES = 4096  # a wider consumer keeps its first costs: its downdates (≈ 2 f³) would take minutes


def feature_columns(channels: np.ndarray, per_channel: int) -> np.ndarray:
    """Feature columns of input channels: channel c owns ``c*k .. c*k + k - 1``."""
    return (np.asarray(channels)[:, None] * per_channel + np.arange(per_channel)).reshape(-1)


def removal_costs(weights: np.ndarray, inverse: np.ndarray, channels: np.ndarray, per_channel: int) -> np.ndarray:
    """``cost(B_c)`` for each channel c alone, vectorised over channels (blocks of k features);
    for one feature per channel ``Σ_rows W[r, c]² / (H⁻¹)_cc``, without a solve per channel."""
    if per_channel == 1:
        channels = np.asarray(channels, dtype=int)
        slab = weights[:, channels]
        return np.einsum("rc,rc->c", slab, slab) / np.diag(inverse)[channels]
    columns = feature_columns(channels, per_channel).reshape(len(channels), per_channel)
    blocks = inverse[columns[:, :, None], columns[:, None, :]]  # [channels, k, k]
    slabs = np.moveaxis(weights[:, columns], 1, 0)  # [channels, rows, k]
    solved = np.linalg.solve(blocks, np.swapaxes(slabs, 1, 2))  # [channels, k, rows]
    return np.einsum("crk,ckr->c", slabs, solved)


def compensated(weights: np.ndarray, inverse: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]`` for the removed feature columns B."""
    block = inverse[np.ix_(columns, columns)]
    return weights - weights[:, columns] @ np.linalg.solve(block, inverse[columns, :])


def augmented(layer: ConsumerLayer, constants: Mapping[str, np.ndarray]) -> np.ndarray:
    """The layer's ``[rows, features + 1]`` matrix, its bias (or zeros) last; with channel
    statistics each output's bias is shared evenly by its kernel positions' rows."""
    matrix = layer.matrix(constants[layer.weight]).astype(np.float64)
    bias = layer.bias_rows(constants[layer.bias]) if layer.bias else np.zeros(len(matrix))
    return np.hstack([matrix, bias[:, None]])


def compensation_system(stats: LayerStatistics, constants: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(W, (H + λI)⁻¹)`` that removal costs and compensation work with: with a bias, ``W``
    augmented by it and ``H`` by the constant feature, so a removed channel's mean moves into
    the bias; without one, the features alone (a removed channel's mean then costs what the
    remaining channels cannot carry of it)."""
    weights = augmented(stats.layer, constants)
    if stats.layer.bias is None:
        return weights[:, :-1], stats.inverse(DAMPING, with_bias=False)
    return weights, stats.inverse(DAMPING)


def compensate_layer(stats: LayerStatistics, constants: Mapping[str, np.ndarray],
                     channels: np.ndarray) -> dict[str, np.ndarray]:
    """New values of the layer's weight (and bias) once its input ``channels`` are removed,
    at the original shapes (the removed columns become zero)."""
    layer = stats.layer
    weights, inverse = compensation_system(stats, constants)
    result = compensated(weights, inverse, feature_columns(channels, layer.features_per_channel))
    updates = {layer.weight: layer.from_matrix(result[:, : weights.shape[1] - (layer.bias is not None)],
                                               constants[layer.weight])}
    if layer.bias:
        updates[layer.bias] = layer.bias_from_rows(result[:, -1], constants[layer.bias])
    return updates


@dataclass
class Consumer:
    """One consumer layer during a greedy removal: its compensated ``[rows, features]`` weights,
    the inverse Hessian of its features, and the unit each of its input channels belongs to
    (``units[i]`` owns ``channels[i]``)."""

    weights: np.ndarray
    inverse: np.ndarray
    units: np.ndarray
    channels: np.ndarray
    per_channel: int

    def costs(self, present: np.ndarray) -> np.ndarray:
        """Per unit (``len(present)`` of them), the sum of ``cost`` of its channels here, for
        the units still ``present`` (zero for the others)."""
        live = present[self.units]
        costs = removal_costs(self.weights, self.inverse, self.channels[live], self.per_channel)
        return np.bincount(self.units[live], weights=costs, minlength=len(present))

    @property
    def frozen(self) -> bool:
        """Too wide to downdate: its costs stay the first ones."""
        return self.inverse.shape[0] > GREEDY_MAX_FEATURES

    def remove(self, units: np.ndarray) -> None:
        """Compensate the weights for the channels of ``units`` and downdate the inverse (new
        arrays: the statistics' own stay as they are)."""
        columns = feature_columns(self.channels[np.isin(self.units, units)], self.per_channel)
        if len(columns):
            solved = np.linalg.solve(self.inverse[np.ix_(columns, columns)], self.inverse[columns, :])
            self.weights = self.weights - self.weights[:, columns] @ solved
            self.inverse = self.inverse - self.inverse[:, columns] @ solved


def greedy_scores(consumers: list[Consumer], unit_count: int, candidates: list[int],
                  steps: int = GREEDY_STEPS) -> np.ndarray:
    """Scores whose ascending order is the greedy joint removal order of ``candidates``.

    In each of ``steps`` blocks the ``⌈GREEDY_SHARE · candidates / steps⌉`` units of least
    summed cost (over the consumers, given the units already removed) are removed and every
    consumer updated (:meth:`Consumer.remove`). A removed unit scores the running maximum of the
    costs at its removal, so that scores rise along the order and their differences are the
    marginal costs; the units left score that maximum plus their costs after the last block.
    Units that are not candidates score their first costs. With one step, the units removed
    are ordered by their one-at-a-time costs."""
    everyone = np.ones(unit_count, dtype=bool)
    frozen = sum((c.costs(everyone) for c in consumers if c.frozen), np.zeros(unit_count))
    updated = [c for c in consumers if not c.frozen]

    def costs(present: np.ndarray) -> np.ndarray:
        return frozen + sum((c.costs(present) for c in updated), np.zeros(unit_count))

    scores = costs(everyone)
    present = np.zeros(unit_count, dtype=bool)
    present[np.asarray(candidates, dtype=int)] = True
    removable = int(GREEDY_SHARE * len(candidates))
    block = max(1, math.ceil(removable / max(1, steps)))
    highest, removed = 0.0, 0
    while removed < removable:
        current = costs(present)
        left = np.flatnonzero(present)
        taken = left[np.argsort(current[left], kind="stable")[: min(block, removable - removed)]]
        scores[taken] = np.maximum.accumulate(np.maximum(current[taken], highest))
        highest = float(scores[taken[-1]])
        present[taken] = False
        removed += len(taken)
        for consumer in updated:
            consumer.remove(taken)
    left = np.flatnonzero(present)
    if len(left):
        scores[left] = highest + costs(present)[left]
    return scores
