"""The ``latency`` target: onnxruntime latency measured on this machine, as terms of channel counts.

**The metric.** :class:`Latency` profiles the model at a few uniform widths: the model itself and
variants keeping ``widths`` (0.8, 0.6, 0.4, 0.2) of every group's channels (uniform plans of
:func:`~spa_compiler.allocate.allocate` under the run's constraints, so rounding is what the run
will use, rewritten by :func:`~spa_compiler.rewrite.rewrite_model`). The widths run in rounds, one
inference of each per round, with onnxruntime's profiler on and off (:mod:`spa_compiler.profiling`);
at each width ``w`` that measures

- ``T(w)``: the whole-model latency, the median over the rounds without the profiler (one thread,
  batch as bound, CPU time of the inference thread: see :mod:`spa_compiler.bench`);
- ``t_n(w)``: the kernel time of each node ``n``, the fastest over the profiled rounds
  (fused kernels are charged to the original nodes);

and the latency the kernels leave unaccounted for, ``T(w) - sum_n t_n(w)``: the session's overhead
(running a graph, copying inputs and outputs) and kernels no original node owns (inserted layout
reorders). Its constant part ``a`` (:meth:`LatencyProfile.overhead_ms`, the intercept of the line
through the points ``(sum_n t_n(w), T(w))``) is a constant term; the rest is spread in proportion,
each node's times scaled by ``(T(w) - a) / sum_n t_n(w)``. A compute node's term has its MAC axes
(as the ``flops`` metric); any other profiled node's (pooling, an Add onnxruntime did not fuse) the
axes of its first output. The term is a function of ``x = prod(kept sizes) / prod(original
sizes)``: piecewise linear through the points ``(x_n(w), scaled t_n(w))`` (made non-decreasing by
pooling adjacent violators), extended below the narrowest width along its first segment, never
below zero. At the profiled widths the terms add up to the measured ``T(w)``; a node whose axes
keep their sizes at every width is a constant.

Profiles are cached in ``$SPA_PRUNE_CACHE`` (default ``~/.cache/spa-prune``) under a hash of the
model, its bound input shapes, the channel counts of every width, the run counts, onnxruntime's
version and the thread count, so a second run on the same model and constraints measures nothing.

**The pass.** :class:`AllocateLatency` allocates on these terms, then times the whole pruned model
against the original (rounds of both, :data:`CHECK_RUNS` at least). While the measured ratio ``m``
misses the target ``t`` by more than half of :data:`LATENCY_TOLERANCE`, it allocates again for the
budget scaled by ``t / m`` (the budget, not the ratio the terms predicted for the plan, which is
below it by up to a removal step: a model whose steps are coarse still moves); once budgets
measured on both sides of the target are known, the next one is interpolated linearly between
the closest two (:func:`next_budget`: a small model whose time falls off a step when its widths
shrink, 0.98 measured for one budget and 0.35 for the next, is not sent back and forth between
them), in :data:`ROUNDS` rounds at most, stopping early when a plan comes back. It keeps the
round measured closest to the target among those at most ``t + LATENCY_TOLERANCE``, and raises
:class:`~spa_compiler.errors.TargetError` when there is none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from .allocate import Constraints, Plan, Target, allocate
from .analysis import Analysis
from .bench import measure_latencies
from .config import TARGET_TOLERANCE
from .cost import CostMetric, Term, get_metric, register_metric
from .errors import TargetError
from .shapes import shape_skeleton, synthetic_inputs
from .profiling import profile_models
from .rewrite import removed_indices, rewrite_model
from .stages import Allocate, check_reachable
from .state import PruneState
from .verify import custom_ops

__all__ = [
    "Latency", "LatencyProfile", "Curve", "AllocateLatency", "cache_dir", "LATENCY_TOLERANCE", "CHECK_RUNS",
    "ROUNDS", "WIDTHS", "OVERHEAD", "next_budget",
]

log = logging.getLogger(__name__)

LATENCY_TOLERANCE = 0.03
CHECK_RUNS = 20
ROUNDS = 6
CLOCK = time.thread_time
WIDTHS = (0.8, 0.6, 0.4, 0.2)  # fractions of every group's channels kept by the profiled variants
_FORMAT = 3  # of the cached profiles
OVERHEAD = "onnxruntime session overhead"  # the name of the constant term


def cache_dir() -> Path:
    """Where latency profiles are kept: ``$SPA_PRUNE_CACHE``, else ``~/.cache/spa-prune``."""
    return Path(os.environ.get("SPA_PRUNE_CACHE") or Path.home() / ".cache" / "spa-prune")


@dataclass
class LatencyProfile:
    """What was measured at each profiled width: ``keep`` the fraction of every group's channels
    kept, ``latency_ms`` the whole-model latency, ``kernel_ms`` the kernel time charged to each
    node (None where the node ran no kernel it was charged)."""

    keep: list[float]
    latency_ms: list[float]
    kernel_ms: dict[str, list[float | None]]

    def charged_ms(self) -> np.ndarray:
        """The kernel time charged to some node, at each width."""
        return np.nansum(np.asarray(list(self.kernel_ms.values()), dtype=np.float64), axis=0)

    def coverage(self) -> list[float]:
        """The share of each width's latency that the charged kernel times account for."""
        return list(self.charged_ms() / np.asarray(self.latency_ms))

    def overhead_ms(self) -> float:
        """The part of the latency no width changes: the intercept ``a`` of the least-squares
        line ``T(w) = a + c * charged(w)``, within ``[0, min_w (T(w) - charged(w))]``."""
        charged, latency = self.charged_ms(), np.asarray(self.latency_ms)
        if len(latency) < 2:
            return 0.0
        _, intercept = np.polyfit(charged, latency, 1)
        return float(np.clip(intercept, 0.0, max(0.0, float(np.min(latency - charged)))))


def _non_decreasing(y: np.ndarray) -> np.ndarray:
    """The least-squares non-decreasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in y:
        blocks.append([float(value), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.repeat([m for m, _ in blocks], [int(c) for _, c in blocks])


class Curve:
    """A node's time as a function of its axes' kept sizes, through measured points (see the
    module docstring); ``full`` is the product of the original sizes."""

    def __init__(self, full: float, x: np.ndarray, y: np.ndarray) -> None:
        self.full = full
        self.x, inverse = np.unique(x, return_inverse=True)
        self.y = _non_decreasing(np.bincount(inverse, weights=y) / np.bincount(inverse))

    def __call__(self, sizes: Sequence[float]) -> float:
        x = math.prod(sizes) / self.full
        if len(self.x) == 1 or x >= self.x[0]:
            return float(np.interp(x, self.x, self.y))
        slope = (self.y[1] - self.y[0]) / (self.x[1] - self.x[0])
        return max(0.0, float(self.y[0] + slope * (x - self.x[0])))


@register_metric("latency")
class Latency(CostMetric):
    """Measured onnxruntime latency in milliseconds (see the module docstring). ``progress``
    hears what is being profiled; ``profile`` holds the measurements once terms were asked for."""

    label = "latency"
    description = "onnxruntime latency on this machine (1 thread, batch as bound), profiled per node"

    def __init__(
        self, constraints: Constraints | None = None, threads: int = 1, widths: Sequence[float] = WIDTHS,
        runs: int = 15, progress: Callable[[str], None] | None = None, cache: Path | None = None,
    ) -> None:
        self.constraints = constraints or Constraints()
        self.threads, self.widths, self.runs, self.cache = threads, tuple(widths), runs, cache
        self.progress = progress or (lambda message: None)
        self.profile: LatencyProfile | None = None
        self.kept = np.zeros((0, 0))  # kept size of every axis (columns) at every profiled width (rows)
        self._terms: tuple[Analysis, list[Term]] | None = None

    def terms(self, analysis: Analysis) -> list[Term]:
        """Profiled (or read from the cache) once per analysis."""
        if self._terms is None or self._terms[0] is not analysis:
            unrunnable = custom_ops(analysis.graph)
            if unrunnable:
                raise TargetError(
                    f"--latency needs onnxruntime to run the model, and it cannot run {', '.join(unrunnable)}"
                )
            removals = self.uniform_removals(analysis)
            self.profile = self._cached(analysis, removals)
            self.kept = np.stack([[ref.size for ref in analysis.axes]] * len(removals)).astype(np.float64)
            for k, removed in enumerate(removals):
                for axis, indices in removed.items():
                    self.kept[k, axis] -= len(indices)
            self._terms = (analysis, self._build_terms(analysis, self.profile))
        return self._terms[1]

    def profiled_totals(self, analysis: Analysis) -> list[float]:
        """The terms' sum at each profiled width: what they make of ``profile.latency_ms``."""
        terms = self.terms(analysis)
        return [sum(t.value([kept[a] for a in t.axes]) for t in terms) for kept in self.kept]

    def uniform_removals(self, analysis: Analysis) -> list[dict[int, np.ndarray]]:
        """The indices leaving each axis at each profiled width (none at the first, the model)."""
        flat = {g.id: np.zeros(len(g.units)) for g in analysis.groups}
        flops = get_metric("flops")
        removals: list[dict[int, np.ndarray]] = [{}]
        for keep in self.widths:
            plan = allocate(analysis, flat, Target("ratio", 1.0 - keep), self.constraints, flops)
            removals.append(removed_indices(analysis, plan.removed))
        return removals

    def _key(self, analysis: Analysis, removals: list[dict[int, np.ndarray]]) -> str:
        graph = analysis.graph
        digest = hashlib.sha256(shape_skeleton(graph.model, graph.input_shapes).SerializeToString())  # weights aside
        digest.update(json.dumps(dict(
            format=_FORMAT, inputs=sorted(graph.input_shapes.items()), widths=self.widths, runs=self.runs,
            threads=self.threads, onnxruntime=ort.__version__, machine=platform.machine(),
            removed=[sorted((int(axis), len(indices)) for axis, indices in r.items()) for r in removals],
        )).encode())
        return digest.hexdigest()[:32]

    def _cached(self, analysis: Analysis, removals: list[dict[int, np.ndarray]]) -> LatencyProfile:
        path = (self.cache or cache_dir()) / f"latency-{self._key(analysis, removals)}.json"
        try:
            profile = LatencyProfile(**json.loads(path.read_text()))
            self.progress(f"latency profile read from {path}")
            return profile
        except (OSError, ValueError, TypeError):
            pass
        profile = self.measure(analysis, removals)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
                json.dump(asdict(profile), file)
            os.replace(file.name, path)
        except OSError as exc:
            log.warning("the latency profile was not cached: %s", exc)
        return profile

    def measure(self, analysis: Analysis, removals: list[dict[int, np.ndarray]]) -> LatencyProfile:
        """Profile the model and its uniformly narrowed variants, run in rounds."""
        graph = analysis.graph
        feeds = synthetic_inputs(graph.input_shapes, graph.dtypes)
        compute = {t.name for t in get_metric("flops").terms(analysis)}
        self.progress(f"rewriting the model at {len(self.widths)} uniform widths to profile its latency")
        models = [graph.model] + [rewrite_model(analysis, removed) for removed in removals[1:]]
        self.progress(f"profiling latency per node at {len(models)} widths with onnxruntime")
        charged, latency_ms = profile_models(
            graph, models, feeds, compute, self.runs, threads=self.threads, clock=CLOCK
        )
        kernel_ms: dict[str, list[float | None]] = {}
        for k, times in enumerate(charged):
            for node, ms in times.items():
                kernel_ms.setdefault(node, [None] * len(models))[k] = ms
        return LatencyProfile([1.0, *self.widths], latency_ms, kernel_ms)

    def _build_terms(self, analysis: Analysis, profile: LatencyProfile) -> list[Term]:
        if not profile.kernel_ms:
            raise TargetError(
                "--latency: onnxruntime's profile names none of the model's nodes, so its latency cannot be "
                "attributed to channels"
            )
        times = np.asarray(list(profile.kernel_ms.values()), dtype=np.float64)
        overhead = profile.overhead_ms()
        times *= (np.asarray(profile.latency_ms) - overhead) / np.maximum(np.nansum(times, axis=0), 1e-12)
        axes_of = _node_axes(analysis)
        terms = [Term(OVERHEAD, [], lambda sizes: overhead)]
        for node, measured in zip(profile.kernel_ms, times):
            axes = axes_of.get(node, [])
            full = math.prod(self.kept[0, axes])
            x = np.prod(self.kept[:, axes], axis=1) / full
            seen = ~np.isnan(measured)
            terms.append(Term(node, axes, Curve(full, x[seen], measured[seen])))
        return terms


def _node_axes(analysis: Analysis) -> dict[str, list[int]]:
    """The axes a node's time depends on: a compute node's MAC axes, else its first output's."""
    graph = analysis.graph
    axes = {t.name: t.axes for t in get_metric("flops").terms(analysis)}
    for node in graph.nodes:
        if node.name not in axes and node.outputs and node.outputs[0] in graph.shapes:
            found = (analysis.axis_id(node.outputs[0], k) for k in range(graph.rank(node.outputs[0])))
            axes[node.name] = [a for a in found if a is not None]
    return axes


@dataclass
class _Round:
    plan: Plan  # achieved: the ratio the terms predict
    before_ms: float
    after_ms: float

    @property
    def measured(self) -> float:
        return self.after_ms / self.before_ms


class AllocateLatency(Allocate):
    """Allocate for ``--latency`` and check the result by timing it (see the module docstring).
    Fills ``latency_before_ms``/``latency_after_ms`` with the kept round's measurement, and the
    plan's ``achieved`` with its measured ratio."""

    description = "allocating the latency target (profiling with onnxruntime)"

    def run(self, state: PruneState) -> PruneState:
        config, analysis = state.config, state.analysis
        target, constraints = config.target(), config.constraints()
        metric = config.metric(progress=state.note)
        graph = analysis.graph
        feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, config.seed)
        rounds: list[_Round] = []
        tried: list[tuple[float, float]] = []  # (budget, measured ratio)
        budget = target.value
        for _ in range(ROUNDS):
            plan = allocate(
                analysis, state.scores, Target(target.kind, budget), constraints, metric, TARGET_TOLERANCE,
                state.cost_exponent,
            )
            if not rounds:
                check_reachable(analysis, target, plan, constraints, metric)
            elif any(plan.removed == r.plan.removed for r in rounds):
                break
            pruned = rewrite_model(analysis, removed_indices(analysis, plan.removed))
            before, after = measure_latencies(
                [graph.model, pruned], feeds, max(config.bench_runs, CHECK_RUNS), threads=metric.threads,
                min_seconds=2.0, clock=CLOCK,
            )
            rounds.append(_Round(plan, before, after))
            state.note(f"latency ratio predicted {plan.achieved:.3f}, measured {after / before:.3f}")
            if abs(after / before - target.value) <= LATENCY_TOLERANCE / 2:
                break
            tried.append((budget, after / before))
            budget = next_budget(tried, target.value)
        chosen = _choose(rounds, target, analysis, constraints, metric)
        state.plan = replace(chosen.plan, achieved=chosen.measured)
        state.removed_by_axis = removed_indices(analysis, chosen.plan.removed)
        state.latency_before_ms, state.latency_after_ms = chosen.before_ms, chosen.after_ms
        return state


def next_budget(tried: list[tuple[float, float]], target: float) -> float:
    """The budget to allocate next, from the ``(budget, measured ratio)`` pairs so far: linear
    between the closest budgets measured below and above ``target`` when there are both, else
    the last budget scaled by ``target / measured``."""
    below = [pair for pair in tried if pair[1] < target]
    above = [pair for pair in tried if pair[1] > target]
    if below and above:
        (b0, m0), (b1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        budget = b0 + (target - m0) * (b1 - b0) / (m1 - m0)
    else:
        budget, measured = tried[-1]
        budget *= target / measured
    return float(np.clip(budget, 0.01, 0.99))


def _choose(
    rounds: list[_Round], target: Target, analysis: Analysis, constraints: Constraints, metric: CostMetric
) -> _Round:
    """The round measured closest to the target among those within the tolerance above it."""
    fitting = [r for r in rounds if r.measured <= target.value + LATENCY_TOLERANCE]
    if not fitting:
        closest = min(rounds, key=lambda r: r.measured)
        try:  # above the target by more than the allocation's tolerance: raises, saying why
            check_reachable(analysis, target, replace(closest.plan, achieved=closest.measured), constraints, metric)
        except TargetError as exc:
            raise TargetError(
                f"{exc}; measured with onnxruntime after {len(rounds)} allocation rounds "
                f"(the latency profile predicted {closest.plan.achieved:.3f})"
            ) from None
    chosen = min(fitting, key=lambda r: abs(r.measured - target.value))
    if chosen.measured < target.value - LATENCY_TOLERANCE:
        log.warning(
            "--latency %g: the measured latency ratio is %.3f, below the target by more than %g after %d "
            "allocation rounds (the latency profile predicted %.3f)",
            target.value, chosen.measured, LATENCY_TOLERANCE, len(rounds), chosen.plan.achieved,
        )
    return chosen
