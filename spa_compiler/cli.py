"""The ``spa-prune`` command: a thin typer front end over :mod:`spa_compiler`."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import onnxruntime as ort
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .api import analyze as analyze_model
from .api import prune
from .config import PruneConfig
from .criteria import available_criteria
from .errors import InputError, OutputError, SpaError
from .shapes import parse_input_shapes
from .model_files import check_output_path
from .ops import registered_ops
from .report import render_analysis, render_report
from .versions import versions_line

__all__ = ["app", "main", "make_config", "reported_errors", "check_report_dir", "written_after"]

EXAMPLES = """
Examples:

  spa-prune model.onnx --flops 0.5 -o small.onnx

  spa-prune det.onnx --flops 0.5 --input-shape x=1x3x640x640 --json-report report.json

  spa-prune model.onnx --params 0.6 --criterion l1 --scope uniform --round-to 16

  spa-prune model.onnx --latency 0.5    (measured: onnxruntime, 1 thread, on this machine)

  spa-prune model.onnx --flops 0.5 --criterion obs --calib data.npz --eval my_accuracy.py

  spa-prune model.onnx --flops 0.5 --report report/    (report.md and widths.png)

  spa-prune sweep model.onnx --flops 0.9,0.7,0.5 --criterion l2,obs --report sweep/    (see spa-prune sweep --help)

  spa-prune distill small.onnx --teacher model.onnx --data train.npz    (train toward the original; see spa-prune distill --help)

  spa-prune model.onnx --analyze

  spa-prune --list-ops | --list-criteria
"""

app = typer.Typer(add_completion=False, help="Structured pruning for ONNX models." + EXAMPLES)
console = Console()
errors = Console(stderr=True)


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".pruned.onnx")


def _list_ops() -> None:
    table = Table(title="op rules")
    for column in ("op", "opsets", "channel mapping"):
        table.add_column(column)
    for domain, op_type, low, high, summary in registered_ops():
        table.add_row(f"{domain + '::' if domain else ''}{op_type}", f"{low}-{high}", summary)
    console.print(table)
    console.print("Any other op is a barrier: channels reaching it are never pruned.")


def _list_criteria() -> None:
    table = Table(title="criteria (--criterion NAME)")
    table.add_column("name")
    table.add_column("score")
    for name, description in available_criteria().items():
        table.add_row(name, description)
    console.print(table)


# Options a single run and a sweep share (one definition, used by both commands' signatures).
SCOPE = typer.Option("global", help="global: rank channels across layers; uniform: same ratio everywhere.")
ROUND_TO = typer.Option(
    16, help="Keep channel counts multiples of N: onnxruntime's fast CPU kernels need 8 (AVX2) or 16 (AVX-512)."
)
MIN_KEEP = typer.Option(0.1, help="Keep at least this fraction of every group's channels.")
EXCLUDE = typer.Option([], help="Node name whose channels must not be pruned (repeatable).")
INPUT_SHAPE = typer.Option([], help="Bind a dynamic input: NAME=1x3x224x224 (repeatable); inputs sharing a named "
                           "dimension take its size. Without it, the --calib arrays' shapes bind the free dimensions.")
PRUNE_HIDDEN = typer.Option(
    False, "--prune-hidden", help="Also prune the hidden size through LayerNorms (lossy, transformers)."
)
HEAD_DIMS = typer.Option(
    None, "--head-dims/--heads", show_default="head dims where every attention can be rotated",
    help="Prune attention head dimensions, each head first rotated (exactly) so that the dimensions pruned "
         "carry the least, or whole heads. By default: head dimensions when statistics are collected and every "
         "attention's heads can be rotated, whole heads otherwise.",
)
CALIB = typer.Option(
    None, help="Calibration data for obs/activation: .npz keyed by input name, a folder of .npy files, or one .npy "
    "for a model of one input. "
    "Without it the inputs are synthetic, shaped like what the graph expects; a model of the BERT uncased "
    "vocabulary reads English sentences that ship with spa-prune; a causal language model writes its own text."
)
CALIB_SAMPLES = typer.Option(
    None, min=1, show_default=False,
    help="Calibration samples used (synthetic ones without --calib): 128 of a --calib file by default (more of a larger "
    "file when 128 sequences hold too few tokens for the widest layer); without it 512 synthetic token sequences for "
    "token inputs, 256 synthetic pictures for image inputs, 2048 synthetic audio clips for waveform inputs (of large "
    "pictures and long clips as many as 2 GB and 512 MB hold, at least 128), else 128.",
)
CALIB_BATCH = typer.Option(
    16, min=1, help="Samples whose statistics rows are drawn together, and at most per onnxruntime run (fewer where "
    "a run would hold over 64 MB of layer inputs; exactly its declared batch where the model fixes it inside).",
)
ALLOCATION = typer.Option(
    "sensitivity", help="sensitivity: share the target by each group's measured effect on the outputs; "
    "score: by criterion scores alone (faster)."
)
EVAL_SCRIPT = typer.Option(
    None, "--eval", help="A Python file defining score(model_path) -> float: your metric, before and after."
)
REFIT = typer.Option(
    1, min=0, help="Rounds of re-fitting every layer toward the original outputs on the pruned network (0: off); "
    "without --calib each layer moves half the way, the inputs being synthetic."
)
SEED = typer.Option(0, help="Seed of synthetic inputs and the random criterion.")
BENCH_RUNS = typer.Option(20, min=0, help="onnxruntime timing runs before and after (0: skip).")
DEBUG = typer.Option(False, "--debug", help="Show tracebacks and debug logging.")


def make_config(
    criterion: Optional[str], scope: str, round_to: int, min_keep: float, exclude: List[str], input_shape: List[str],
    prune_hidden: bool, head_dims: Optional[bool], calib: Optional[Path], calib_samples: Optional[int], calib_batch: int,
    allocation: str, eval_script: Optional[Path], refit: int, seed: int, bench_runs: int, **target: Optional[float],
) -> PruneConfig:
    """The run's configuration from the shared options (``target``: flops/params/ratio/latency)."""
    return PruneConfig(
        **target, criterion=criterion, scope=scope, round_to=round_to, min_keep=min_keep, exclude=tuple(exclude),
        prune_hidden=prune_hidden, head_dims=head_dims, input_shapes=parse_input_shapes(input_shape), seed=seed,
        bench_runs=bench_runs, calibration=str(calib) if calib else None, calibration_samples=calib_samples,
        calibration_batch=calib_batch, allocation=allocation, refit_rounds=refit,
        evaluation=str(eval_script) if eval_script else None,
    )


def check_report_dir(directory: Path) -> None:
    """A report directory may exist (its files are replaced) but must not be a file, and the
    nearest directory that exists on its path must be writable (the rest is created)."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--report {directory} is a file; give a directory for report.md and the pictures")
    existing = next(p for p in (directory.absolute(), *directory.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputError(f"cannot write the report in {directory}: {existing} is not a writable directory")


@contextmanager
def written_after(model: Path, what: str) -> Iterator[None]:
    """Writing ``what`` once ``model`` is written: a failure says so, rather than that nothing was."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{model} was written, but {what} could not be ({exc.strerror or exc})") from None


@contextmanager
def reported_errors(debug: bool) -> Iterator[None]:
    """Every failure as one line on stderr and an exit code (2: the user's input, 130: interrupted,
    3: a bug); ``debug`` shows tracebacks instead."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    if not debug:  # the command owns the process: onnxruntime's optimiser notes (a node it leaves) stay quiet
        ort.set_default_logger_severity(3)
    try:
        yield
    except SpaError as exc:
        if debug:
            raise
        _error("error", str(exc))
        raise typer.Exit(code=2)
    except KeyboardInterrupt:
        _error("interrupted", "nothing was written")
        raise typer.Exit(code=130)
    except Exception as exc:  # a bug: still one line, and the way to see more
        if debug:
            raise
        _error(
            "internal error",
            f"{type(exc).__name__}: {exc}; nothing was written. Rerun with --debug and report the traceback.",
        )
        raise typer.Exit(code=3)


@app.command(help="Prune MODEL (an .onnx file) to a target and write a smaller dense ONNX model." + EXAMPLES)
def run(
    model: Optional[Path] = typer.Argument(None, help="Input .onnx model (never modified).", show_default=False),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Output path.", show_default="MODEL.pruned.onnx"
    ),
    flops: Optional[float] = typer.Option(None, help="Keep at most this fraction of the FLOPs (MACs), e.g. 0.5."),
    params: Optional[float] = typer.Option(None, help="Keep at most this fraction of the parameters."),
    ratio: Optional[float] = typer.Option(None, help="Remove this fraction of the channels of every group."),
    latency: Optional[float] = typer.Option(
        None, help="Keep at most this fraction of the onnxruntime latency (1 thread, batch as bound), measured on "
        "this machine: profiled per node, checked by timing the result (profiles cached in ~/.cache/spa-prune "
        "or $SPA_PRUNE_CACHE).",
    ),
    criterion: Optional[str] = typer.Option(
        None, help="Channel importance criterion (see --list-criteria); default: obs with --calib, obs_joint without.",
        show_default=False,
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
    json_report: Optional[Path] = typer.Option(None, help="Also write the report as JSON to this path."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report", help="Also write report.md (widths per group before and after) and widths.png into DIR."
    ),
    bench_runs: int = BENCH_RUNS,
    reinit: bool = typer.Option(
        False, "--reinit", help="Write the pruned architecture with fresh weights (PyTorch's default initialisation, "
        "BatchNorm as identity), to train from scratch."
    ),
    depth: int = typer.Option(
        0, min=0, help="Remove this many whole residual branches (attention or FFN sublayers, residual blocks), "
        "least output distortion per FLOP saved first, before width pruning meets the rest of the target."
    ),
    units: str = typer.Option(
        "width", help="width: channels, neurons and heads; depth: only whole residual branches, until the target."
    ),
    allow_io_change: List[str] = typer.Option(
        [], "--allow-io-change", help="Let the graph inputs/outputs matching this pattern change size (repeatable; "
        "fnmatch, e.g. 'past_key_values.*' and 'present.*' to prune the key/value heads of a decoder's cache). "
        "By default the interface keeps its shapes; the report lists the new ones."
    ),
    analyze: bool = typer.Option(False, "--analyze", help="Print the channel groups and barriers; prune nothing."),
    list_ops: bool = typer.Option(False, "--list-ops", help="List the ops spa-prune understands."),
    list_criteria: bool = typer.Option(False, "--list-criteria", help="List the available criteria."),
    version: bool = typer.Option(False, "--version", help="Print the versions of spa-prune, onnx, onnxruntime, "
                                 "NumPy and Python, and exit."),
    debug: bool = DEBUG,
) -> None:
    with reported_errors(debug):
        if version:
            console.print(versions_line(), highlight=False)
            return
        if list_ops or list_criteria:
            _list_ops() if list_ops else _list_criteria()
            return
        if model is None:
            raise InputError("give a model: spa-prune MODEL.onnx --flops 0.5 (see --help)")
        if analyze:
            shapes = parse_input_shapes(input_shape)
            analysis = analyze_model(model, shapes, tuple(exclude), prune_hidden, bool(head_dims))
            render_analysis(analysis, console)
            if head_dims is None and any(analysis.kind(g) == "heads" for g in analysis.groups):
                console.print("attention is shown in whole heads; the default pipeline prunes rotated head dimensions "
                              "instead where every attention can be rotated (--head-dims shows those groups)")
            return
        config = make_config(
            criterion, scope, round_to, min_keep, exclude, input_shape, prune_hidden, head_dims, calib,
            calib_samples, calib_batch, allocation, eval_script, refit, seed, bench_runs,
            flops=flops, params=params, ratio=ratio, latency=latency,
        )
        config = dataclasses.replace(
            config, reinit=reinit, allow_io_change=tuple(allow_io_change), depth=depth, units=units
        )
        if json_report is not None:
            check_output_path(json_report)
        if report_dir is not None:
            check_report_dir(report_dir)
        output = output or _default_output(model)
        with console.status("pruning") as status:
            report = prune(model, output, config, progress=lambda s: status.update(s))
        render_report(report, console)
        if json_report is not None:
            with written_after(output, f"--json-report {json_report}"):
                json_report.write_text(report.to_json())
        if report_dir is not None:
            from .report_files import write_run_report

            with written_after(output, f"the report in {report_dir}"):
                note = write_run_report(report, report_dir)
            console.print(escape(f"report: {report_dir / 'report.md'}" + (f" ({note})" if note else "")))


def _error(label: str, message: str) -> None:
    """One line on stderr; the message is printed verbatim (paths may contain brackets)."""
    errors.print(Text.assemble((f"{label}: ", "bold red"), " ".join(message.split())), soft_wrap=True)


def main() -> None:
    """Console-script entry point: usage errors are one line too, with exit code 2.
    ``spa-prune sweep ...`` runs the sweep command (:mod:`spa_compiler.sweep_cli`),
    ``spa-prune distill ...`` the distillation (:mod:`spa_compiler.distill_cli`)."""
    command, args, name = app, sys.argv[1:], "spa-prune"
    if args[:1] == ["sweep"]:
        from .sweep_cli import sweep_app

        command, args, name = sweep_app, args[1:], "spa-prune sweep"
    elif args[:1] == ["distill"]:
        from .distill_cli import distill_app

        command, args, name = distill_app, args[1:], "spa-prune distill"
    try:
        code = command(args=args, prog_name=name, standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _error("error", f"{message} (see {name} --help)")
        code = getattr(exc, "exit_code", 2)
    except typer.Abort:
        _error("interrupted", "nothing was written")
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
