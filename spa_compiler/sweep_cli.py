"""``spa-prune sweep``: one model pruned at many targets and criteria, a report and a Pareto picture.

Dispatched from :func:`spa_compiler.cli.main`; shares the pruning options of a single run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from .api import output_passes
from .cli import (
    ALLOCATION, BENCH_RUNS, CALIB, CALIB_BATCH, CALIB_SAMPLES, DEBUG, EVAL_SCRIPT, EXCLUDE, HEAD_DIMS, INPUT_SHAPE,
    MIN_KEEP, PRUNE_HIDDEN, REFIT, ROUND_TO, SCOPE, SEED, check_report_dir, console, make_config, reported_errors,
    written_after,
)
from .config import PruneConfig
from .errors import InputError, TargetError
from .model_files import check_input_path
from .report_files import quality, write_sweep_report
from .sweep import PointResult, SweepPoint, SweepProgress, SweepResult, run_sweep, split_passes, sweep_points

__all__ = ["sweep_app", "parse_values"]

EXAMPLES = """
Examples:

  spa-prune sweep model.onnx --flops 0.9,0.8,0.7,0.6,0.5 --report sweep/

  spa-prune sweep model.onnx --latency 0.8,0.6 --criterion l2,obs --calib data.npz --eval my_accuracy.py --report sweep/

  spa-prune sweep model.onnx --flops 0.7,0.5 --ray --report sweep/    (Ray: a local cluster, or the one in RAY_ADDRESS)
"""

sweep_app = typer.Typer(add_completion=False)


def parse_values(option: str, text: Optional[str]) -> list[float]:
    """``"0.9,0.8"`` -> ``[0.9, 0.8]``; None -> ``[]``."""
    if text is None:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--{option} takes fractions separated by commas, e.g. --{option} 0.9,0.7,0.5; got '{text}'") from None


@sweep_app.command(help="Prune MODEL at every target (and criterion), analysis and statistics computed once; "
                   "write sweep.json, report.md and pareto.png into the --report directory, the pruned models "
                   "into its models/ folder." + EXAMPLES)
def sweep(
    model: Path = typer.Argument(..., help="Input .onnx model (never modified).", show_default=False),
    report_dir: Path = typer.Option(..., "--report", help="Directory for sweep.json, report.md, pareto.png, models/."),
    flops: Optional[str] = typer.Option(None, help="FLOPs fractions to keep, e.g. 0.9,0.8,0.7,0.6,0.5."),
    params: Optional[str] = typer.Option(None, help="Parameter fractions to keep."),
    ratio: Optional[str] = typer.Option(None, help="Fractions of every group's channels to remove."),
    latency: Optional[str] = typer.Option(None, help="Measured onnxruntime latency fractions to keep (1 thread)."),
    criterion: Optional[str] = typer.Option(
        None, help="Criteria to compare, separated by commas (see --list-criteria); default: obs with --calib, "
        "obs_joint without.", show_default=False,
    ),
    scope: str = SCOPE,
    round_to: int = ROUND_TO,
    min_keep: float = MIN_KEEP,
    exclude: List[str] = EXCLUDE,
    input_shape: List[str] = INPUT_SHAPE,
    prune_hidden: bool = PRUNE_HIDDEN,
    head_dims: Optional[bool] = HEAD_DIMS,
    calib: Optional[Path] = CALIB,
    calib_samples: Optional[int] = CALIB_SAMPLES,
    calib_batch: int = CALIB_BATCH,
    allocation: str = ALLOCATION,
    eval_script: Optional[Path] = EVAL_SCRIPT,
    refit: int = REFIT,
    seed: int = SEED,
    bench_runs: int = BENCH_RUNS,
    use_ray: bool = typer.Option(
        False, "--ray", help="Run the points as Ray tasks and collect statistics in shards (also when RAY_ADDRESS is set)."
    ),
    debug: bool = DEBUG,
) -> None:
    with reported_errors(debug):
        check_input_path(model)
        check_report_dir(report_dir)
        targets = {kind: parse_values(kind, text) for kind, text in
                   (("flops", flops), ("params", params), ("ratio", ratio), ("latency", latency))}
        targets = {kind: values for kind, values in targets.items() if values}
        if not targets:
            raise TargetError("give the targets to sweep, e.g. --flops 0.9,0.8,0.7,0.6,0.5 (or --params, --ratio, --latency)")
        base = make_config(
            criterion, scope, round_to, min_keep, exclude, input_shape, prune_hidden, head_dims, calib,
            calib_samples, calib_batch, allocation, eval_script, refit, seed, bench_runs,
        )
        criteria = criterion or base.criterion_name
        points = sweep_points([c.strip() for c in criteria.split(",") if c.strip()], targets)
        for point in points:
            split_passes(point.config(base))  # checks every target, criterion and option before any work
        engine = _engine(use_ray)
        start = time.perf_counter()
        with _bars(points, base, report_dir / "models") as progress:
            result = run_sweep(model, base, points, report_dir, engine, progress)
        with written_after(report_dir / "models", "the sweep's report"):
            note = write_sweep_report(result, report_dir)
        _summary(result, time.perf_counter() - start)
        console.print(escape(f"wrote {report_dir / 'sweep.json'}, {report_dir / 'report.md'}"
                             + (f" ({note})" if note else f", {report_dir / 'pareto.png'}")))
        if all(r.report is None for r in result.points):
            raise TargetError(f"every point failed; the first: {result.points[0].error}")


def _engine(use_ray: bool):
    from .distributed import ray_requested

    if not ray_requested(use_ray):
        return None
    from .distributed import RayEngine

    with console.status("starting Ray"):
        return RayEngine()


class _bars:
    """A progress bar per point (steps: its passes) under a line for the shared passes."""

    def __init__(self, points: list[SweepPoint], base: PruneConfig, models: Path) -> None:
        self.points, self.base, self.models = points, base, models
        width = max(len(p.label) for p in points)
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}", table_column=Column(min_width=width)),
                             BarColumn(bar_width=16), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                             console=console)

    def __enter__(self) -> SweepProgress:
        bars = self.bars.__enter__()
        shared = bars.add_task("shared", total=1, status="")
        tasks = [bars.add_task(escape(p.label), total=None, status="queued", start=False) for p in self.points]

        def shared_note(message: str) -> None:
            bars.update(shared, status=escape(message))

        def prepared() -> None:
            bars.update(shared, completed=1, status="done")

        def point(index: int):
            config = self.points[index].config(self.base)
            steps = [getattr(p, "description", "") or p.name for p in
                     [*split_passes(config)[1], *output_passes(config, self.models / self.points[index].filename)]]
            bars.start_task(tasks[index])
            bars.update(tasks[index], total=len(steps), completed=0)

            def note(message: str) -> None:
                if message in steps:
                    bars.update(tasks[index], completed=steps.index(message))
                bars.update(tasks[index], status=escape(message[:40]))

            return note

        def finished(index: int, result: PointResult) -> None:
            status = f"done in {result.seconds:.1f} s" if result.report else f"[red]failed[/]: {escape(result.error[:40])}"
            bars.start_task(tasks[index])
            bars.update(tasks[index], total=1, completed=1, status=status)

        return SweepProgress(shared_note, point, finished, prepared)

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)


def _summary(result: SweepResult, seconds: float) -> None:
    table = Table(title=escape(f"sweep of {result.model} ({result.engine}, {seconds:.1f} s wall time)"))
    for column in ("point", "FLOPs", "params", "latency", "quality", "status"):
        table.add_column(column, justify="left" if column in ("point", "status") else "right")
    for r in result.points:
        report = r.report
        if report is None:
            error = r.error if len(r.error) <= 60 else r.error[:57] + "..."
            table.add_row(escape(r.point.label), "-", "-", "-", "-", escape(f"failed: {error} (see report.md)"))
            continue
        latency = f"{report.latency_ratio:.3f}" if report.latency_ratio is not None else "-"
        q = quality(report)
        table.add_row(escape(r.point.label), f"{report.flops_ratio:.3f}", f"{report.params_ratio:.3f}", latency,
                      f"{q:.4f}" if q is not None else "-", "ok")
    console.print(table)
