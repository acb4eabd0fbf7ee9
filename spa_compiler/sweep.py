"""Sweeps: one model pruned at many targets and criteria, its analysis and statistics computed once.

The default pipeline (:func:`~spa_compiler.api.default_passes`) splits at allocation. The passes
before it do not depend on the target: ``analyse`` and ``calibrate`` not on the criterion either,
so they run once for the whole sweep; ``score`` (and ``sensitivity``) once per criterion. Each
point then *forks* that state (a shallow copy: the graph, analysis, statistics and scores are
shared and only read; the compensated weights, timings and memory figures are its own) and runs the passes
from allocation on (allocate, compensate, re-fit, rewrite, verify), then saves, scores with
``--eval``, times and reports exactly as a single run does. A point's figures are therefore those
of :func:`~spa_compiler.api.prune` at the same options (the tests check it); only measured
latencies differ, as any two timings do. ``--eval`` scores the original model once for all points.

The points run through an *engine*: :class:`InProcess` here, or Ray tasks
(:mod:`spa_compiler.distributed`), which run the same :func:`attempt_point`. A point that fails
(an unreachable target, say) records its error and the sweep goes on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .api import default_passes, input_passes, output_passes
from .config import PruneConfig
from .errors import OutputError, SpaError
from .pipeline import PassLike, Pipeline
from .report import PruneReport
from .stages import Analyse, CollectStatistics
from .state import Progress, PruneState

__all__ = [
    "SweepPoint", "PointResult", "SweepResult", "Engine", "InProcess", "sweep_points", "split_passes",
    "prepare", "attempt_point", "run_sweep",
]

TARGET_KINDS = ("flops", "params", "ratio", "latency")
SHARED_BY_ALL = ("analyse", "calibrate")  # passes that depend on neither target nor criterion
FIRST_PER_TARGET = "allocate"


@dataclass(frozen=True)
class SweepPoint:
    """One pruning run of the sweep: a criterion and a target."""

    criterion: str
    target_kind: str
    target_value: float

    @property
    def label(self) -> str:
        return f"{self.criterion} --{self.target_kind} {self.target_value:g}"

    @property
    def filename(self) -> str:
        return f"{self.criterion}_{self.target_kind}{self.target_value:g}.onnx"

    def config(self, base: PruneConfig) -> PruneConfig:
        """``base`` with this point's criterion and target (and no other target)."""
        targets = {kind: None for kind in TARGET_KINDS}
        return replace(base, criterion=self.criterion, **{**targets, self.target_kind: self.target_value})


def sweep_points(criteria: list[str], targets: dict[str, list[float]]) -> list[SweepPoint]:
    """Every criterion at every target value, criterion by criterion, targets as given; a point
    listed twice (``--flops 0.5,0.50``) runs once."""
    points = [SweepPoint(c, kind, value) for c in criteria for kind, values in targets.items() for value in values]
    return list(dict.fromkeys(points))


@dataclass
class PointResult:
    """A point's report, or the one-line error that stopped it; wall seconds it took."""

    point: SweepPoint
    report: PruneReport | None
    error: str | None
    seconds: float


@dataclass
class SweepResult:
    """Every point of a sweep, with what the points share."""

    model: str
    engine: str
    points: list[PointResult]
    eval_before: float | None
    shared_timings: dict[str, float]  # seconds of the passes run once for all points
    wall_seconds: float
    criterion_timings: dict[str, dict[str, float]] = field(default_factory=dict)  # once per criterion

    def to_dict(self) -> dict[str, Any]:
        points = [
            {**asdict(r.point), "label": r.point.label, "error": r.error, "seconds": r.seconds,
             "report": r.report.to_dict() if r.report is not None else None}
            for r in self.points
        ]
        return {"model": self.model, "engine": self.engine, "eval_before": self.eval_before,
                "shared_timings": self.shared_timings, "criterion_timings": self.criterion_timings,
                "wall_seconds": self.wall_seconds, "points": points}


def split_passes(config: PruneConfig) -> tuple[list[PassLike], list[PassLike]]:
    """The default passes before allocation (target-free) and from allocation on."""
    passes = default_passes(config)
    at = Pipeline(passes).names.index(FIRST_PER_TARGET)
    return passes[:at], passes[at:]


def fork(state: PruneState, config: PruneConfig) -> PruneState:
    """A copy of ``state`` for ``config`` sharing what later passes only read."""
    return replace(state, config=config, compensated=dict(state.compensated), timings=dict(state.timings),
                   peak_mb=dict(state.peak_mb), progress=None)


def prepare(
    source: Path, base: PruneConfig, points: list[SweepPoint], progress: Progress | None = None,
    statistics: CollectStatistics | None = None,
) -> dict[str, PruneState]:
    """Per criterion, the state ready for allocation: the model loaded and analysed once, the
    layer statistics collected once (by ``statistics``; only for criteria whose pipeline
    collects them), then scored (and sensitivities measured) per criterion. With ``--eval`` the
    original model's score is in every state."""
    first = points[0].config(base)
    shared = Pipeline([*input_passes(base), Analyse()], progress)(PruneState(first, source=source))
    with_statistics = None
    states = {}
    for point in points:
        if point.criterion in states:
            continue
        config = point.config(base)
        before_allocation = split_passes(config)[0]
        start = shared
        if any(p.name == "calibrate" for p in before_allocation):
            if with_statistics is None:
                with_statistics = Pipeline([statistics or CollectStatistics()], progress)(fork(shared, config))
            start = with_statistics
        own = [p for p in before_allocation if p.name not in SHARED_BY_ALL]
        states[point.criterion] = Pipeline(own, progress)(fork(start, config))
        states[point.criterion].progress = None
    return states


def attempt_point(
    state: PruneState, point: SweepPoint, base: PruneConfig, directory: Path, progress: Progress | None = None
) -> tuple[PruneReport | None, str | None, float]:
    """Run one point from allocation on and write its model into ``directory``: its report, or
    None and the error that stopped it; and the wall seconds it took."""
    start = time.perf_counter()
    config = point.config(base)
    try:
        passes = [*split_passes(config)[1], *output_passes(config, Path(directory) / point.filename)]
        report = Pipeline(passes, progress)(fork(state, config)).report
        return report, None, time.perf_counter() - start
    except Exception as exc:  # one failed point must not end the sweep
        message = " ".join(str(exc).split())
        if not isinstance(exc, SpaError):
            message = f"{type(exc).__name__}: {message}"
        return None, message, time.perf_counter() - start


class Engine(Protocol):
    """Runs the sweep's points; yields each finished point's index and outcome."""

    name: str

    def prepare(self, source: Path, base: PruneConfig, points: list[SweepPoint], progress: Progress | None) -> dict[str, PruneState]: ...

    def run(self, states: dict[str, PruneState], points: list[SweepPoint], base: PruneConfig, directory: Path,
            progress_for: Callable[[int], Progress | None]) -> Iterator[tuple[int, tuple[PruneReport | None, str | None, float]]]: ...


class InProcess:
    """Every point in this process, one after the other."""

    name = "in-process"

    def prepare(self, source, base, points, progress):
        return prepare(source, base, points, progress)

    def run(self, states, points, base, directory, progress_for):
        for index, point in enumerate(points):
            yield index, attempt_point(states[point.criterion], point, base, directory, progress_for(index))


@dataclass
class SweepProgress:
    """What a front end is told: a line while the shared passes run and when they are done, then
    per point a line while it runs (in process) and its outcome when done."""

    shared: Progress | None = None
    point: Callable[[int], Progress | None] = field(default=lambda index: None)
    finished: Callable[[int, PointResult], None] = field(default=lambda index, result: None)
    prepared: Callable[[], None] = field(default=lambda: None)


def run_sweep(
    source: str | Path, base: PruneConfig, points: list[SweepPoint], directory: str | Path,
    engine: Engine | None = None, progress: SweepProgress | None = None,
) -> SweepResult:
    """Prune ``source`` at every point, the pruned models written into ``directory``/models."""
    engine, progress = engine or InProcess(), progress or SweepProgress()
    models = Path(directory) / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {models} for the sweep's models: {exc.strerror or exc}") from None
    start = time.perf_counter()
    states = engine.prepare(Path(source), base, points, progress.shared)
    progress.prepared()
    results: dict[int, PointResult] = {}
    for index, (report, error, seconds) in engine.run(states, points, base, models, progress.point):
        results[index] = PointResult(points[index], report, error, seconds)
        progress.finished(index, results[index])
    shared = ("load", *SHARED_BY_ALL)
    shared_timings = {n: t for state in states.values() for n, t in state.timings.items() if n in shared}
    criterion_timings = {c: {n: t for n, t in state.timings.items() if n not in shared} for c, state in states.items()}
    return SweepResult(
        str(source), engine.name, [results[i] for i in range(len(points))], next(iter(states.values())).eval_before,
        shared_timings, time.perf_counter() - start, criterion_timings,
    )
