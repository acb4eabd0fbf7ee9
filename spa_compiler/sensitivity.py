"""Allocation from measured sensitivity: how much pruning each group distorts the model's outputs.

Local costs from different layers do not compare: a squared error in an early convolution and
one in a classifier head mean different things for the outputs. This pass measures instead. For
each group and a few widths, the group alone is pruned (its lowest-scored units by the
criterion, the consumer layers compensated from their statistics when there are any) and the
model's outputs on calibration samples are compared with the original's:

    D_g(n) = Σ_outputs ‖Y'(n) − Y‖² / Σ_outputs ‖Y‖²        (n units of group g removed)

Pruning a group is emulated exactly without rewriting the model: every consumer weight is also
declared a graph input (``with_weight_inputs``), so a session serves every measurement of a
group and a measurement feeds the consumers' new weights (zero columns for the removed
channels, which is what removing them computes). The curve ``D_g`` is made convex (its lower
convex hull, so marginal costs rise) and turned into per-unit scores: the k-th unit of the
group in criterion order scores the increase ``D_g(k) − D_g(k−1)``, made strictly increasing
(:func:`strictly_increasing`) so that the units of one straight piece of the hull still go in
the criterion's order. Allocation then removes steps in the order of measured
distortion per cost saved (``cost_exponent = 1``): the greedy solution of the knapsack "least
total distortion within the budget", treating the groups' distortions as additive.

Which units a group loses first is the criterion's order, or, with ``--calib``, that of its
``alternative`` (``obs`` and ``obs_joint``: the same second-order cost, units chosen one at a
time or jointly with the inverse Hessian updated): both orders are measured with the group's
middle count removed and the one that distorts the outputs less is kept, group by group. On
the accuracy benchmark at ``--flops 0.5``, calibrated, the PP-OCRv4 recogniser reads 0.999 of
its characters (0.990 in ``obs``'s order throughout), the digits ResNet at 0.3 keeps 1.000 of
its test images (0.989; 0.9972 against 0.9940 over six draws of calibration images); the
direction classifier keeps 0.940 (0.945), MiniLM 0.948 (0.947). Data-free the choice is not
made: measured on synthetic inputs it misleads. Nor is it for a model whose measurements fit
the budget only at one width per group (ResNet-50): the joint order of its 2048-wide groups
alone would take longer than all its measurements (31 s of scoring against 10 s).

A measurement runs only the part of the network the changed weights affect
(:mod:`~spa_compiler.subnetwork`), from the activations one run of the whole network left at
that part's boundary (the whole network when building the part's session would cost more than
the part saves: ``SESSION_MACS_PER_BYTE`` MACs per byte of its weights). What the measurements
may cost is bounded: ``budget`` MACs in all (``BUDGET_MACS``, a few seconds of onnxruntime on
two cores; the MACs of each group's part, per sample and measured width). A model whose
measurements would cost more is measured on fewer samples (down to ``LEAST_SAMPLES``), then,
if still too costly, at one width per group (the middle one): its curve is then the measured distortion scaled by the criterion's
cumulative scores, ``D_g(n) = D_g(m) · S_g(n) / S_g(m)`` with ``S_g(n)`` the sum of the ``n``
lowest scores (the local, compensated removal costs of the second-order criterion), so one
run per group measures how much the group's local error matters to the outputs. A group whose
removal no weight emulates (head dimensions of queries and keys whose heads could not be
rotated: nothing reads them through a weight) cannot be measured, and is not pruned.
"""

from __future__ import annotations

import logging
import math
from itertools import chain
from typing import Callable

import numpy as np
import onnx

from .allocate import DISTORTION_EXPONENT, unit_steps
from .analysis import Group
from .batch_axis import exact_batch
from .sample_layout import model_feeds, padded, unpadded
from .calibrate import LayerStatistics, exposing, with_weight_inputs
from .cost import node_macs
from .criteria import ScoreContext, get_criterion
from .ir import Graph
from .pipeline import Pass
from .quantized import as_stored, zero_slabs
from .rewrite import removed_indices
from .secondorder import compensate_layer
from .state import PruneState
from .subnetwork import part_macs, reads, tail_boundary, tail_model, tail_nodes
from .token_mask import attention_mask, padding_zeroed
from .verify import session_for

__all__ = [
    "MeasureSensitivity", "TailRunner", "convex_increments", "strictly_increasing", "samples_for", "measurement_plan", "scaled_by_scores",
]

log = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the units a group may lose, at which it is measured
SAMPLES = 32  # calibration samples a measurement runs, at most ...
LEAST_SAMPLES = 8  # ... and at least (see samples_for)
OUTPUT_VALUES = 2**18  # output values a measurement should see, when samples allow
BUDGET_MACS = 4e11  # MACs all measurements may run (about 10 s of onnxruntime on two cores)
SESSION_MACS_PER_BYTE = 60  # a part's session costs about as long as onnxruntime takes for 60 MACs per weight byte
CACHE_BYTES = 2**30  # boundary activations kept for the measurements, at most


def samples_for(output_values_per_sample: int, available: int, most: int = SAMPLES) -> int:
    """Samples per measurement: enough for ``OUTPUT_VALUES`` output values, between
    ``LEAST_SAMPLES`` and ``most``. A distortion over dense outputs (a detector's score map,
    a recogniser's per-position class scores) averages over many values per sample and needs
    fewer samples than a classifier's few scores; each measurement runs the whole network. But
    those values are not independent: data-free, at the default round-to 16, four synthetic
    lines took the recogniser's 128-channel stage 2 convolution for half free (character
    accuracy 0.725 at ``--flops 0.75``); eight keep it at 96 channels (0.969)."""
    wanted = -(-OUTPUT_VALUES // max(output_values_per_sample, 1))
    return max(1, min(available, most, max(LEAST_SAMPLES, wanted)))


def measurement_plan(costs: list[tuple[float, int]], samples: int, budget: float) -> tuple[int, bool]:
    """``(samples, every width)`` for groups whose measurements cost ``(MACs per sample, widths)``
    each: the samples given, or fewer (not below ``LEAST_SAMPLES``) so that all widths fit in
    ``budget``; when even that does not fit, one width per group, on as many samples as fit."""
    per_sample = sum(macs * widths for macs, widths in costs)
    least = min(samples, LEAST_SAMPLES)
    if samples * per_sample <= budget:
        return samples, True
    if least * per_sample <= budget:
        return max(least, int(budget // per_sample)), True
    one_width = sum(macs for macs, widths in costs if widths)
    return max(least, min(samples, int(budget // max(one_width, 1.0)))), False


def scaled_by_scores(scores: np.ndarray, measured: int, distortion: float, counts: list[int]) -> np.ndarray:
    """Distortions at ``counts`` from one measured at ``measured``, in proportion to the cumulative
    ``scores`` (those of the units in removal order, negative ones as zero):
    ``D(n) = D(m) · S(n) / S(m)``; in proportion to ``n`` where the scores sum to zero."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.maximum(np.nan_to_num(scores, posinf=0.0), 0.0))])
    at = np.asarray(counts)
    if cumulative[measured] <= 0:
        return distortion * at / max(measured, 1)
    return distortion * cumulative[at] / cumulative[measured]


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


def strictly_increasing(increments: np.ndarray) -> np.ndarray:
    """``increments`` (non-decreasing up to rounding, as :func:`convex_increments` gives them)
    made strictly increasing by the least floating-point steps: units along one straight piece of
    the hull share an increment, and allocation, which takes a group's lowest scores first,
    would then order them by index, not in the criterion's order the curve was measured in."""
    result = np.array(increments, dtype=np.float64)
    for k in range(1, len(result)):
        result[k] = max(result[k], np.nextafter(result[k - 1], np.inf))
    return result


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _weights_read(model: onnx.ModelProto, changed: set[str]) -> set[str]:
    """The initializers the part of ``model`` that ``changed`` affects reads."""
    initializers = {t.name for t in model.graph.initializer}
    return {name for node in tail_nodes(model, changed) for name in reads(node) if name in initializers}


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """One output from its values run by run: joined on the first axis (stacked when scalar)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts[0].ndim else np.stack(parts)


class TailRunner:
    """The model's outputs on fixed samples when some weights (graph inputs of ``model``) take
    new values, each run computing only the part of the network those weights affect, from the
    activations at its boundary that one run of the whole network left. When those activations
    would take more than ``CACHE_BYTES``, every run is of the whole network instead. Outputs are
    float64, zero at padding positions (:mod:`~spa_compiler.token_mask`)."""

    def __init__(self, graph: Graph, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 changed: list[set[str]]) -> None:
        self.graph, self.model = graph, model
        self.samples = len(next(iter(feeds.values())))
        self.batch = exact_batch(graph) or self.samples  # as the re-fit's runs
        self.mask = attention_mask(feeds)
        boundary = sorted(set().union(*(tail_boundary(model, tail_nodes(model, c)) for c in changed)) - set(feeds))
        cached = all(name in graph.shapes and name in graph.dtypes for name in boundary) and sum(
            int(np.prod(graph.shapes[name][1:])) * onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name]).itemsize
            for name in boundary
        ) * self.samples <= CACHE_BYTES
        self.whole = session_for(exposing(model, boundary) if cached else model)
        starts = range(0, self.samples, self.batch)
        self.counts = [min(self.batch, self.samples - start) for start in starts]  # the last run's may be padded
        self.runs = [model_feeds(graph, padded({k: v[i:i + self.batch] for k, v in feeds.items()}, self.batch))
                     for i in starts]
        names = list(graph.outputs) + (boundary if cached else [])
        per_run = [dict(zip(names, self.whole.run(names, run))) for run in self.runs]  # the parts run on these, padded
        outputs = [self._unpadded([r[name] for name in graph.outputs], count) for r, count in zip(per_run, self.counts)]
        self.reference = {name: self._outputs(_joined(list(parts)))
                          for name, parts in zip(graph.outputs, zip(*outputs))}
        # each run's activations as that run computed them: their first axis need not be the batch
        self.boundary_runs = [{**run, **{n: r[n] for n in boundary}} for run, r in zip(self.runs, per_run)] if cached else None

    def tail(self, changed: set[str], whole: bool = False) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """A function from new values of the weights ``changed`` to the outputs they change, by
        runs of the whole network if ``whole`` (a part nearly as large is not worth its session)."""
        if whole or self.boundary_runs is None:
            session, names, runs = self.whole, list(self.graph.outputs), self.runs
        else:
            part, boundary = tail_model(self.model, changed, self.graph.dtypes)
            names = [value.name for value in part.graph.output]
            session = session_for(part) if names else None
            runs = [{name: run[name] for name in boundary} for run in self.boundary_runs]

        def outputs(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if session is None:
                return {}
            results = [self._unpadded(session.run(names, {**run, **weights}), count)
                       for run, count in zip(runs, self.counts)]
            return {name: self._outputs(_joined(parts)) for name, parts in zip(names, zip(*results))}

        return outputs

    def _unpadded(self, values: list[np.ndarray], count: int) -> list[np.ndarray]:
        return unpadded(values, count, self.batch)

    def _outputs(self, y: np.ndarray) -> np.ndarray:
        return padding_zeroed(y.astype(np.float64), self.mask)


class MeasureSensitivity(Pass):
    """Replace the scores by measured marginal output distortions (see the module docstring)."""

    name, description = "sensitivity", "measuring each group's effect on the outputs"
    requires = ("graph", "analysis", "scores", "statistics", "calibration_data")
    provides = ("scores",)

    def __init__(self, fractions: tuple[float, ...] = FRACTIONS, samples: int = SAMPLES,
                 budget: float = BUDGET_MACS) -> None:
        self.fractions = fractions
        self.samples = samples
        self.budget = budget

    def run(self, state: PruneState) -> PruneState:
        if not state.calibration_data:
            return state  # nothing to run the model on (custom ops onnxruntime cannot run)
        graph, analysis, config = state.graph, state.analysis, state.config
        layers: dict[int, LayerStatistics] = {
            analysis.axis_id(s.layer.weight, s.layer.axis): s for s in state.statistics.values()
        }
        zeroable = state.rotation.zeroable if state.rotation is not None else {}
        overridable = {analysis.axes[a].tensor for a in [*analysis.tags.get("consumer", []), *chain(*zeroable.values())]}
        overridable |= {s.layer.bias for s in layers.values() if s.layer.bias}
        model = with_weight_inputs(graph.model, overridable)
        constraints = config.constraints()
        groups = [g for g in analysis.groups if g.prunable]
        orders = {g.id: g.ranked(state.scores[g.id]) for g in groups}
        steps = unit_steps(analysis, constraints)
        counts = {g.id: self._counts(g, len(orders[g.id]), constraints.min_keep, steps[g.id]) for g in groups}
        changed = {g.id: set(self._pruned_weights(state, layers, g, orders[g.id], compensate=False)) for g in groups}
        unmeasurable = [g for g in groups if not changed[g.id]]
        if unmeasurable:
            log.warning("%d groups cannot be measured (no weight emulates their removal) and are kept whole: %s",
                        len(unmeasurable), ", ".join(g.name for g in unmeasurable[:3]))
        groups = [g for g in groups if changed[g.id]]
        samples, every_width, whole = self._plan(state, model, groups, counts, changed, {})
        alternatives = self._alternative_orders(state, groups, orders) if every_width else {}
        if alternatives:
            samples, every_width, whole = self._plan(state, model, groups, counts, changed, alternatives)
        feeds = {name: array[:samples] for name, array in state.calibration_data.items()}
        runner = TailRunner(graph, model, feeds, list(changed.values()))
        energy = sum(float(np.sum(y * y)) for y in runner.reference.values()) or 1.0
        scores = {**state.scores, **{g.id: np.full(len(g.units), np.inf) for g in unmeasurable}}
        taken = 0
        for done, group in enumerate(groups):
            state.note(f"measuring sensitivity of group {done + 1}/{len(groups)}")
            order, measured = orders[group.id], counts[group.id]
            if not every_width and measured:
                measured = [measured[len(measured) // 2]]
            outputs = runner.tail(changed[group.id], whole[group.id])

            def distortion(units: list[int]) -> float:
                pruned = outputs(self._pruned_weights(state, layers, group, units))
                return sum(float(np.sum((y - runner.reference[name]) ** 2)) for name, y in pruned.items()) / energy

            known: dict[int, float] = {}
            alternative = alternatives.get(group.id)
            if alternative is not None and measured:
                middle = counts[group.id][len(counts[group.id]) // 2]
                given, other = distortion(order[:middle]), distortion(alternative[:middle])
                if other < given:
                    order, given, taken = alternative, other, taken + 1
                known[middle] = given
            distortions = [known[count] if count in known else distortion(order[:count]) for count in measured]
            if not every_width and measured:
                measured, distortions = counts[group.id], scaled_by_scores(
                    state.scores[group.id][order], measured[0], distortions[0], counts[group.id]
                )
            increments = np.zeros(len(order))
            if measured:
                increments = convex_increments(np.asarray(measured), np.asarray(distortions), len(order))
            group_scores = np.full(len(group.units), np.inf)
            group_scores[order] = strictly_increasing(increments)
            scores[group.id] = group_scores
        state.scores = scores
        state.cost_exponent = DISTORTION_EXPONENT
        if alternatives:
            state.order_choice = (f"{taken} of {len(alternatives)} groups in {self._alternative_name(state)}'s order, "
                                  f"the rest in {state.config.criterion_name}'s: whichever distorted the outputs "
                                  "less at the group's middle width")
        return state

    @staticmethod
    def _alternative_name(state: PruneState) -> str | None:
        return get_criterion(state.config.criterion_name).alternative

    def _alternative_orders(self, state: PruneState, groups: list[Group],
                            orders: dict[int, list[int]]) -> dict[int, list[int]]:
        """Each group's units in the order of the criterion's ``alternative`` (the same cost
        chosen one at a time or jointly), where it scores the group and orders it differently;
        none data-free: measured on synthetic inputs the choice misleads (the PP-OCRv4
        recogniser at ``--flops 0.5`` read 0.710 of its characters with it, 0.874 without)."""
        name = self._alternative_name(state)
        if name is None or not state.statistics or not state.config.calibration:
            return {}
        criterion, context = get_criterion(name), ScoreContext(state.analysis, state.config.seed, state.statistics)
        alternatives = {}
        for group in groups:
            if context.statistics_for(group):
                order = group.ranked(criterion.score(group, context))
                if order != orders[group.id]:
                    alternatives[group.id] = order
        return alternatives

    def _plan(self, state: PruneState, model: onnx.ModelProto, groups: list[Group], counts: dict[int, list[int]],
              changed: dict[int, set[str]], alternatives: dict[int, list[int]]) -> tuple[int, bool, dict[int, bool]]:
        """``(samples, every width, whole network per group)``: what the measurements run within
        the budget (:func:`measurement_plan`, each group's part of the network counted), and for
        which groups a part would not save what its session costs."""
        graph = state.graph
        macs = node_macs(state.analysis)
        total = sum(macs.values())
        costs = [(part_macs(tail_nodes(model, changed[g.id]), macs), len(counts[g.id]) + (g.id in alternatives))
                 for g in groups]
        per_sample = sum(int(np.prod(graph.shapes[name][1:])) for name in graph.outputs if name in graph.shapes)
        wanted = samples_for(per_sample, len(next(iter(state.calibration_data.values()))), self.samples)
        samples, every_width = measurement_plan(costs, wanted, self.budget)
        log.info("sensitivity: %d samples, %s", samples, "every width" if every_width else "one width per group")
        whole = {
            g.id: (total - cost) * samples * (widths if every_width else 1)
            < SESSION_MACS_PER_BYTE * sum(graph.constants[name].nbytes for name in _weights_read(model, changed[g.id]))
            for g, (cost, widths) in zip(groups, costs)
        }
        return samples, every_width, whole

    def _counts(self, group: Group, removable: int, min_keep: float, step: int) -> list[int]:
        """Removal counts measured: fractions of what the group may lose, on its rounding grid
        (``step`` units)."""
        n = len(group.units)
        floor = max(1, math.ceil(min_keep * n))
        most = min(removable, n - floor)
        counts = {min(most, max(step, int(round(f * most / step)) * step)) for f in self.fractions}
        return sorted(c for c in counts if c > 0)

    @staticmethod
    def _pruned_weights(state: PruneState, layers: dict[int, LayerStatistics], group: Group, units: list[int],
                        compensate: bool = True) -> dict[str, np.ndarray]:
        """Consumer weights (and biases) that emulate removing ``units`` of ``group`` (for a
        rotated query/key group, which has none, its projections' zeroed columns); without
        ``compensate``, the layers with statistics keep their weights (for their names)."""
        graph = state.graph
        constants = graph.constants
        zeroable = set(state.rotation.zeroable.get(group.id, [])) if state.rotation is not None else set()
        weights: dict[str, np.ndarray] = {}
        for axis, channels in removed_indices(state.analysis, {group.id: units}).items():
            stats = layers.get(axis)
            if stats is not None:
                layer = stats.layer
                weights.update(compensate_layer(stats, graph.float_constants, channels) if compensate else
                               {name: constants[name] for name in (layer.weight, layer.bias) if name})
            elif axis in zeroable or axis in set(state.analysis.tags.get("consumer", [])):
                ref = state.analysis.axes[axis]
                value = weights.get(ref.tensor, constants[ref.tensor]).copy()
                zero_slabs(graph, ref.tensor, value, ref.axis, channels)
                weights[ref.tensor] = value
        return {name: as_stored(graph, name, value).astype(constants[name].dtype) for name, value in weights.items()}
