"""Allocation from measured sensitivity: how much pruning each group distorts the model's outputs.

Local costs from different layers do not compare: a squared error in an early convolution and
one in a classifier head mean different things for the outputs. This pass measures instead. For
each group and a few widths, the group alone is pruned (its lowest-scored units by the
criterion, the consumer layers compensated from their statistics when there are any) and the
model's outputs on calibration samples are compared with the original's:

    D_g(n) = Σ_outputs ‖Y'(n) − Y‖² / Σ_outputs ‖Y‖²        (n units of group g removed)

Pruning a group is emulated exactly without rewriting the model: every consumer weight is also
declared a graph input (``with_weight_inputs``), so one onnxruntime session serves every
measurement and a measurement feeds the consumers' new weights (zero columns for the removed channels, which is what removing
them computes). The curve ``D_g`` is made convex (its lower convex hull, so marginal costs rise)
and turned into per-unit scores: the k-th unit of the group in criterion order scores the
increase ``D_g(k) − D_g(k−1)``. Allocation then removes steps in the order of measured
distortion per cost saved (``cost_exponent = 1``): the greedy solution of the knapsack "least
total distortion within the budget", treating the groups' distortions as additive.
"""

from __future__ import annotations

import math

import numpy as np

from .analysis import Group
from .calibrate import LayerStatistics, fixed_batch, with_weight_inputs
from .pipeline import Pass
from .quantized import zero_slabs
from .rewrite import removed_indices
from .secondorder import compensate_layer
from .state import PruneState
from .token_mask import attention_mask, padding_zeroed
from .verify import session_for

__all__ = ["MeasureSensitivity", "convex_increments", "samples_for"]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the units a group may lose, at which it is measured
SAMPLES = 32  # calibration samples a measurement runs, at most ...
LEAST_SAMPLES = 4  # ... and at least
OUTPUT_VALUES = 2**18  # output values a measurement should see, when samples allow


def samples_for(output_values_per_sample: int, available: int, most: int = SAMPLES) -> int:
    """Samples per measurement: enough for ``OUTPUT_VALUES`` output values, between
    ``LEAST_SAMPLES`` and ``most``. A distortion over dense outputs (a detector's score map,
    a recogniser's per-position class scores) averages over many values per sample and needs
    fewer samples than a classifier's few scores; each measurement runs the whole network."""
    wanted = -(-OUTPUT_VALUES // max(output_values_per_sample, 1))
    return max(1, min(available, most, max(LEAST_SAMPLES, wanted)))


def convex_increments(counts: np.ndarray, distortions: np.ndarray, total: int) -> np.ndarray:
    """Per-unit increments of the lower convex hull of ``(counts, distortions)`` (starting at
    ``(0, 0)``), for units ``1..total``; past the last measured count the last slope goes on."""
    points = [(0.0, 0.0)] + sorted(zip(counts.astype(float), np.maximum(distortions, 0.0)))
    hull: list[tuple[float, float]] = []
    for point in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    xs, ys = np.array([p[0] for p in hull]), np.array([p[1] for p in hull])
    grid = np.arange(total + 1, dtype=float)
    values = np.interp(grid, xs, ys)
    if len(xs) > 1 and total > xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        beyond = grid > xs[-1]
        values[beyond] = ys[-1] + slope * (grid[beyond] - xs[-1])
    return np.diff(values)


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


class MeasureSensitivity(Pass):
    """Replace the scores by measured marginal output distortions (see the module docstring)."""

    name, description = "sensitivity", "measuring each group's effect on the outputs"
    requires = ("graph", "analysis", "scores", "statistics", "calibration_data")
    provides = ("scores",)

    def __init__(self, fractions: tuple[float, ...] = FRACTIONS, samples: int = SAMPLES) -> None:
        self.fractions = fractions
        self.samples = samples

    def run(self, state: PruneState) -> PruneState:
        if not state.calibration_data:
            return state  # nothing to run the model on (custom ops onnxruntime cannot run)
        graph, analysis, config = state.graph, state.analysis, state.config
        layers: dict[int, LayerStatistics] = {
            analysis.axis_id(s.layer.weight, s.layer.axis): s for s in state.statistics.values()
        }
        overridable = {analysis.axes[a].tensor for a in analysis.tags.get("consumer", [])}
        overridable |= {s.layer.bias for s in layers.values() if s.layer.bias}
        session = session_for(with_weight_inputs(graph.model, overridable))
        per_sample = sum(int(np.prod(graph.shapes[name][1:])) for name in graph.outputs if name in graph.shapes)
        count = samples_for(per_sample, len(next(iter(state.calibration_data.values()))), self.samples)
        feeds = {name: array[:count] for name, array in state.calibration_data.items()}
        batch = 1 if fixed_batch(graph) else len(next(iter(feeds.values())))
        mask = attention_mask(feeds)  # outputs at padding count for nothing

        def outputs(weights: dict[str, np.ndarray]) -> list[np.ndarray]:
            count = len(next(iter(feeds.values())))
            runs = [session.run(None, {**{k: v[i:i + batch] for k, v in feeds.items()}, **weights})
                    for i in range(0, count, batch)]
            return [padding_zeroed(np.concatenate(parts).astype(np.float64), mask) for parts in zip(*runs)]

        reference = outputs({})
        energy = sum(float(np.sum(y * y)) for y in reference) or 1.0
        constraints = config.constraints()
        groups = [g for g in analysis.groups if g.prunable]
        scores = dict(state.scores)
        for done, group in enumerate(groups):
            state.note(f"measuring sensitivity of group {done + 1}/{len(groups)}")
            order = sorted(group.prunable, key=lambda k: (state.scores[group.id][k], k))
            counts = self._counts(group, len(order), constraints)
            distortions = []
            for count in counts:
                weights = self._pruned_weights(state, layers, group, order[:count])
                pruned = outputs(weights)
                distortions.append(sum(float(np.sum((a - b) ** 2)) for a, b in zip(pruned, reference)) / energy)
            increments = convex_increments(np.asarray(counts), np.asarray(distortions), len(order)) if counts else np.zeros(len(order))
            group_scores = np.full(len(group.units), np.inf)
            group_scores[order] = increments
            scores[group.id] = group_scores
        state.scores = scores
        state.cost_exponent = 1.0
        return state

    def _counts(self, group: Group, removable: int, constraints) -> list[int]:
        """Removal counts measured: fractions of what the group may lose, on its rounding grid."""
        n = len(group.units)
        floor = max(1, math.ceil(constraints.min_keep * n))
        most = min(removable, n - floor)
        step = constraints.rounding_for(n)
        counts = {min(most, max(step, int(round(f * most / step)) * step)) for f in self.fractions}
        return sorted(c for c in counts if c > 0)

    @staticmethod
    def _pruned_weights(state: PruneState, layers: dict[int, LayerStatistics], group: Group, units: list[int]) -> dict[str, np.ndarray]:
        """Consumer weights (and biases) that emulate removing ``units`` of ``group``."""
        constants = state.graph.constants
        weights: dict[str, np.ndarray] = {}
        for axis, channels in removed_indices(state.analysis, {group.id: units}).items():
            stats = layers.get(axis)
            if stats is not None:
                weights.update(compensate_layer(stats, constants, channels))
            elif axis in set(state.analysis.tags.get("consumer", [])):
                ref = state.analysis.axes[axis]
                value = weights.get(ref.tensor, constants[ref.tensor]).copy()
                zero_slabs(state.graph, ref.tensor, value, ref.axis, channels)
                weights[ref.tensor] = value
        return {name: value.astype(constants[name].dtype) for name, value in weights.items()}
