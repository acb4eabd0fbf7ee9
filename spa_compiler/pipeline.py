"""The pruning pipeline: load -> analyse -> score -> allocate -> rewrite -> verify -> save -> report.

``prune_graph`` works in memory and returns the pruned ModelProto with everything learnt on the
way; ``prune`` adds reading, atomic saving and the latency benchmark around it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnx

from .allocate import Constraints, Plan, Target, allocate
from .analysis import Analysis, analyze_graph
from .bench import measure_latency
from .cost import CostModel
from .criteria import ScoreContext, comparable_scores, get_criterion
from .errors import TargetError
from .ir import Graph, check_input_path, check_output_path, load_model, save_model, synthetic_inputs
from .report import GroupChange, PruneReport
from .calibrate import collect_statistics, consumer_layers, load_calibration, synthetic_calibration
from .rewrite import expected_shapes, removed_indices, rewrite_model
from .verify import Fidelity, custom_ops, verify_model

__all__ = ["PruneConfig", "PruneResult", "prune_graph", "prune", "analyze", "TARGET_TOLERANCE"]

log = logging.getLogger(__name__)

TARGET_TOLERANCE = 0.02
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the output. Exactly one of flops/params/ratio is set."""

    flops: float | None = None
    params: float | None = None
    ratio: float | None = None
    criterion: str = "l2"
    scope: Literal["global", "uniform"] = "global"
    round_to: int = 16
    min_keep: float = 0.1
    exclude: tuple[str, ...] = ()
    prune_hidden: bool = False
    head_dims: bool = False
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    verify: bool = True
    bench_runs: int = 20
    calibration: str | None = None
    calibration_samples: int = 128
    calibration_batch: int = 16

    def target(self) -> Target:
        given = [(k, v) for k, v in (("flops", self.flops), ("params", self.params), ("ratio", self.ratio)) if v is not None]
        if len(given) != 1:
            raise TargetError("give exactly one target: --flops R, --params R or --ratio R (e.g. --flops 0.5)")
        return Target(*given[0])

    def constraints(self) -> Constraints:
        if self.scope not in ("global", "uniform"):
            raise TargetError(f"--scope must be global or uniform, got '{self.scope}'")
        return Constraints(self.scope, self.round_to, self.min_keep)


@dataclass
class PruneResult:
    """A pruned model in memory and what it took."""

    model: onnx.ModelProto
    graph: Graph
    analysis: Analysis
    plan: Plan
    removed_by_axis: dict[int, np.ndarray]
    fidelity: Fidelity | None
    timings: dict[str, float]
    calibration: str | None = None
    compensated: list[str] = field(default_factory=list)


def analyze(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
            exclude: tuple[str, ...] = (), prune_hidden: bool = False, head_dims: bool = False) -> Analysis:
    """Load a model and return its groups, without changing anything."""
    return analyze_graph(load_model(path, input_shapes), exclude, prune_hidden, head_dims)


def _note(progress: Progress | None, stage: str) -> None:
    if progress:
        progress(stage)


def _blocked_summary(analysis: Analysis) -> str:
    reasons = Counter(u.blocked_by for g in analysis.groups for u in g.units if u.blocked_by)
    reasons.update(f"{b.op_type} node '{b.node}': {b.reason}" for b in analysis.barriers)
    top = [reason for reason, _ in reasons.most_common(3)]
    return "; ".join(top) if top else "no channel is blocked"


def _check_reachable(analysis: Analysis, target: Target, plan: Plan, constraints: Constraints) -> None:
    """Raise a TargetError explaining why, when the plan misses the target by more than the
    tolerance: the share of cost no pruning can touch, and the groups too narrow to round."""
    if target.kind == "ratio" or plan.achieved <= target.value + TARGET_TOLERANCE:
        return
    kind = "MACs" if target.kind == "flops" else "parameters"
    cost = CostModel(analysis, "macs" if target.kind == "flops" else "params")
    prunable_axes = {a for g in analysis.groups for u in g.units if not u.blocked for a in u.members}
    fixed = sum(v for t, v in zip(cost.terms, cost.values) if not prunable_axes.intersection(t.axes))
    reasons = [
        f"{fixed / cost.original_total:.0%} of the {kind} are in layers whose channels cannot be pruned "
        f"(blocked by: {_blocked_summary(analysis)})"
    ]
    narrow = [g for g in analysis.groups if g.prunable and len(g.units) < 2 * constraints.round_to]
    if narrow and constraints.round_to > 1:
        reasons.append(
            f"{len(narrow)} of {len(analysis.groups)} groups have fewer than 2 x {constraints.round_to} "
            f"channels and round more finely or keep their width (--round-to 1 removes rounding)"
        )
    reasons.append(f"every group keeps at least {constraints.min_keep:g} of its channels (--min-keep)")
    raise TargetError(
        f"cannot reach --{target.kind} {target.value:g}: the best reachable is {plan.achieved:.3f}; "
        + "; ".join(reasons)
    )


def prune_graph(graph: Graph, config: PruneConfig, progress: Progress | None = None) -> PruneResult:
    """Prune a loaded model in memory (no file is read or written)."""
    target, constraints = config.target(), config.constraints()
    criterion = get_criterion(config.criterion)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    _note(progress, "analysing channel dependencies")
    analysis = analyze_graph(graph, config.exclude, config.prune_hidden, config.head_dims)
    lap("analyse")
    if not any(g.prunable for g in analysis.groups):
        raise TargetError(f"nothing in this model can be pruned; blocked by: {_blocked_summary(analysis)}")
    context = ScoreContext(analysis, config.seed)
    calibration = None
    if criterion.needs_statistics:
        context.statistics, calibration = _statistics(graph, analysis, config, progress)
        lap("calibrate")
    _note(progress, f"scoring {len(analysis.groups)} groups with '{config.criterion}'")
    scores = _scores(criterion, analysis, context)
    lap("score")
    _note(progress, "allocating the target")
    plan = allocate(analysis, scores, target, constraints, TARGET_TOLERANCE)
    _check_reachable(analysis, target, plan, constraints)
    lap("allocate")
    _note(progress, "rewriting the model")
    overrides = criterion.compensate(context, removed_indices(analysis, plan.removed))
    model, removed_by_axis = rewrite_model(analysis, plan.removed, overrides)
    lap("rewrite")
    fidelity = None
    lossy = [g.name for g in analysis.groups if analysis.kind(g) == "hidden" and plan.removed.get(g.id)]
    if lossy:
        log.warning("hidden size pruned through LayerNorm in %d groups: lossy by design", len(lossy))
    if config.verify:
        _note(progress, "verifying with onnx.checker and onnxruntime")
        fidelity = verify_model(graph, model, expected_shapes(analysis, removed_by_axis), config.seed)
        lap("verify")
    return PruneResult(model, graph, analysis, plan, removed_by_axis, fidelity, timings, calibration, sorted(overrides))


def _statistics(graph: Graph, analysis: Analysis, config: PruneConfig, progress: Progress | None):
    """Consumer-layer statistics from ``config.calibration`` or, without it, synthetic inputs;
    and a sentence saying which."""
    layers = consumer_layers(analysis)
    if config.calibration:
        data = load_calibration(config.calibration, graph, config.calibration_samples)
        source = f"{len(next(iter(data.values())))} samples from {config.calibration}"
    else:
        data = synthetic_calibration(graph, config.calibration_samples, config.seed)
        source = f"data-free: {config.calibration_samples} synthetic inputs (standard normal; integers 0)"

    def report(done: int, total: int) -> None:
        _note(progress, f"collecting statistics of {len(layers)} layers: {done}/{total} samples")

    stats = collect_statistics(graph, layers, data, config.calibration_batch, seed=config.seed, progress=report)
    return stats, source


def _scores(criterion, analysis: Analysis, context: ScoreContext) -> dict[int, np.ndarray]:
    """Scores comparable across groups. A self-normalised criterion's scores are used as they
    are; a group it cannot score (no consumer layer with statistics) falls back to the L2
    magnitude's comparable scores, rescaled to the median of the scored groups' mean score."""
    if not criterion.self_normalized:
        return {g.id: comparable_scores(g, criterion.score(g, context), context) for g in analysis.groups}
    scores, unscored = {}, []
    for group in analysis.groups:
        if context.statistics_for(group):
            scores[group.id] = np.asarray(criterion.score(group, context), dtype=np.float64)
        else:
            unscored.append(group)
    if unscored:
        fallback, scale = get_criterion("l2"), float(np.median([s.mean() for s in scores.values()] or [1.0]))
        for group in unscored:
            raw = comparable_scores(group, fallback.score(group, context), context)
            scores[group.id] = raw * scale / (raw.mean() or 1.0)
    return scores


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def prune(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: PruneConfig,
    progress: Progress | None = None,
) -> PruneReport:
    """Prune ``model_path`` into ``output_path`` (written atomically) and report what changed."""
    start = time.perf_counter()
    check_input_path(Path(model_path))
    output = check_output_path(output_path, source=model_path)
    config.target(), config.constraints()
    _note(progress, "loading the model")
    graph = load_model(model_path, config.input_shapes)
    load_time = time.perf_counter() - start
    result = prune_graph(graph, config, progress)
    result.timings = {"load": load_time, **result.timings}
    _note(progress, f"writing {output}")
    clock = time.perf_counter()
    save_model(result.model, output, external_data=graph.uses_external_data)
    result.timings["save"] = time.perf_counter() - clock
    report = build_report(result, config, Path(model_path), output)
    if config.bench_runs and not report.custom_ops:
        _note(progress, "measuring onnxruntime latency (1 thread, batch as bound)")
        feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, config.seed)
        report.latency_before_ms = measure_latency(graph.model, feeds, config.bench_runs)
        report.latency_after_ms = measure_latency(result.model, feeds, config.bench_runs)
    return report


def build_report(result: PruneResult, config: PruneConfig, source: Path, output: Path) -> PruneReport:
    analysis = result.analysis
    costs = {}
    for kind in ("macs", "params"):
        before = CostModel(analysis, kind)
        after = CostModel(analysis, kind)
        for axis, indices in result.removed_by_axis.items():
            after.remove({axis: len(indices)})
        costs[kind] = (before.total, after.total)
    groups = [
        GroupChange(
            name=g.name,
            kind=analysis.kind(g),
            channels_before=len(g.units),
            channels_after=len(g.units) - len(result.plan.removed.get(g.id, [])),
            blocked=len(g.units) - len(g.prunable),
            blocked_by=g.blocked_reasons[0] if g.blocked_reasons else None,
        )
        for g in analysis.groups
    ]
    target = config.target()
    return PruneReport(
        input=str(source),
        output=str(output),
        criterion=config.criterion,
        target_kind=target.kind,
        target_value=target.value,
        scope=config.scope,
        round_to=config.round_to,
        macs_before=costs["macs"][0],
        macs_after=costs["macs"][1],
        params_before=costs["params"][0],
        params_after=costs["params"][1],
        size_before=_file_size(source),
        size_after=_file_size(output),
        groups=groups,
        barriers=[f"{b.op_type} node '{b.node}': {b.reason}" for b in analysis.barriers],
        fidelity=result.fidelity,
        custom_ops=custom_ops(result.graph),
        calibration=result.calibration,
        compensated=len(result.compensated),
        timings=result.timings,
    )
