"""Benchmark: prune, then fine-tune in PyTorch (or train the pruned architecture from scratch), export, measure.

    python -m models.finetune_benchmark [--tasks digits,cls,minilm] [--epochs 3] [--distill]
        [--scratch-epochs 15] [--data-free] [--json results.json]

Every pruned ONNX model goes back into PyTorch with ``spa_compiler.torch.to_torch``, is trained with a
plain PyTorch loop (AdamW, cosine-decayed learning rate, batches of 32, BatchNorm in train mode),
exported with ``torch.onnx.export`` (dynamic batch) and scored on the task's held-out data with
onnxruntime, so every figure is the accuracy of an ONNX file.

- ``digits`` (``models.digits_task``): the digits ResNet pruned at ``--flops`` 0.5 and 0.3 by the
  default pipeline with 128 calibration images, fine-tuned ``--epochs`` on the training split
  (Torch-Pruning's L2 + 3 epochs reach 0.997 / 0.994); and the same architecture with fresh weights
  (``--reinit``) trained ``--scratch-epochs`` with the original recipe (one-cycle, lr 3e-3).
- ``cls`` (``models.ocr_tasks.ClsTask``): PP-OCR's direction classifier, a PaddlePaddle export, pruned
  at 0.5 and fine-tuned on 2000 rendered lines (seed 2, disjoint from test and calibration texts),
  half of them turned by 180 degrees. Its output is already a softmax: the loss reads its log.
- ``minilm`` (``models.minilm_task.MiniLMTask``): all-MiniLM-L6-v2 pruned at 0.5 with 128
  calibration sentences, then distilled as ``spa-prune distill`` does
  (:func:`spa_compiler.torch.distill.distill`: no labels, the loss the relative squared error of
  the hidden states to the unpruned model's over the real tokens; lr 1e-4) on 2000 generated
  sentences (seed 2, none a test or calibration sentence; the last eighth held out). The
  generated sentences share their templates with most test sentences; the task's written cosine
  (65 written sentences) shows what the distillation does for other text. With ``--data-free``
  it is pruned without calibration data and distilled without training data: on the English
  sentences that ship with spa-prune (``spa-prune distill`` without ``--data``).

``--distill`` adds knowledge distillation: the loss is ``0.5 * cross-entropy(labels) + 0.5 *
KL(teacher || student)``, the teacher's distribution being the *unpruned ONNX model's* outputs on the
same (un-augmented) training inputs, computed once with onnxruntime (temperature 2 for logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from spa_compiler import PruneConfig, prune
from spa_compiler.torch import to_torch
from spa_compiler.torch.distill import distill as distill_pruned
from spa_compiler.torch.distill import export_module

from .digits import BATCH_SIZE, DEFAULT_EPOCHS, LEARNING_RATE, load_digits_split
from .digits_task import DigitsTask
from .minilm_task import SEQ_LEN, MiniLMTask, generate_sentences
from .ocr_tasks import ClsTask
from .sentences import tokenize
from .table import print_table, write_json
from .tasks import Task, run_batched
from .text_render import render_lines

__all__ = ["Recipe", "classification_loss", "train", "main"]

TRAIN_SEED = 2
CLS_TRAIN_LINES = 2000
MINILM_TRAIN_SENTENCES = 2000
CALIBRATION_SAMPLES = 128
TEMPERATURE = 2.0


@dataclass(frozen=True)
class Recipe:
    """How to train: ``epochs`` of AdamW at ``learning_rate`` (cosine decay to 0, or one-cycle when
    ``one_cycle``)."""

    epochs: int
    learning_rate: float
    one_cycle: bool = False


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A training loss: ``loss(outputs, index)`` for the model's outputs on the training samples ``index``."""


def _log_probabilities(outputs: torch.Tensor, probabilities: bool, temperature: float = 1.0) -> torch.Tensor:
    if probabilities:
        return torch.log(outputs.clamp_min(1e-8))
    return F.log_softmax(outputs / temperature, dim=1)


def classification_loss(labels: np.ndarray, probabilities: bool = False, teacher: np.ndarray | None = None) -> Loss:
    """Cross-entropy to ``labels`` (classes on axis 1); with ``teacher`` outputs, half of it and half
    ``T² KL(teacher || student)`` at temperature ``T`` (1 for probabilities, ``TEMPERATURE`` for logits)."""
    y = torch.from_numpy(labels).long()
    soft = torch.from_numpy(teacher) if teacher is not None else None
    t = 1.0 if probabilities else TEMPERATURE

    def loss(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        value = F.nll_loss(_log_probabilities(outputs, probabilities), y[index])
        if soft is None:
            return value
        target = soft[index] if probabilities else F.softmax(soft[index] / t, dim=1)
        student = _log_probabilities(outputs, probabilities, t)
        return 0.5 * value + 0.5 * t * t * F.kl_div(student, target, reduction="batchmean")

    return loss


def train(module: torch.nn.Module, inputs: dict[str, np.ndarray], loss: Loss, recipe: Recipe,
          seed: int = 0) -> torch.nn.Module:
    """Train ``module`` on ``inputs`` (fed in their order, samples on axis 0) to lower ``loss``
    by ``recipe``."""
    generator = torch.Generator().manual_seed(seed)
    x = [torch.from_numpy(array) for array in inputs.values()]
    count = len(x[0])
    steps = recipe.epochs * math.ceil(count / BATCH_SIZE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=steps)
                if recipe.one_cycle else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
    module.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            if len(index) < 2:  # BatchNorm in train mode needs two samples
                continue
            outputs = module(*(array[index] for array in x))
            value = loss(outputs[0] if isinstance(outputs, (tuple, list)) else outputs, index)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
    return module.eval()


@dataclass
class Setting:
    """One task of the benchmark: its training inputs (by model input name), how to fine-tune
    (``finetune`` with ``finetune_loss``, named ``finetune_label`` in the table) and how to train
    from scratch (``scratch`` with ``scratch_loss``, or None)."""

    task: Task
    inputs: dict[str, np.ndarray]
    targets: tuple[float, ...]
    finetune: Recipe
    finetune_loss: Loss | None  # None: spa_compiler.torch.distill (spa-prune distill) on the inputs
    finetune_label: str
    scratch: Recipe | None = None
    scratch_loss: Loss | None = None
    reference: dict[float, float] = dataclasses.field(default_factory=dict)


def _single_input(task: Task, images: np.ndarray) -> dict[str, np.ndarray]:
    return {next(iter(task.source()[1])): images.astype(np.float32)}


def _teacher(task: Task, inputs: dict[str, np.ndarray], distill: bool) -> np.ndarray | None:
    """The unpruned model's first output on ``inputs`` when distilling, else None."""
    return run_batched(task.source()[0], inputs) if distill else None


def _classifier_label(distill: bool) -> str:
    return "fine-tuned + distilled" if distill else "fine-tuned"


def _digits(epochs: int, scratch_epochs: int, distill: bool) -> Setting:
    task = DigitsTask()
    x_train, _, y_train, _ = load_digits_split()
    inputs = _single_input(task, x_train)
    return Setting(task, inputs, (0.5, 0.3), Recipe(epochs, 1e-3),
                   classification_loss(y_train, teacher=_teacher(task, inputs, distill)), _classifier_label(distill),
                   Recipe(scratch_epochs, LEARNING_RATE, one_cycle=True) if scratch_epochs else None,
                   classification_loss(y_train), {0.5: 0.997, 0.3: 0.994})


def _cls(epochs: int, scratch_epochs: int, distill: bool) -> Setting:
    task = ClsTask()
    exclude = {line.text for line in task.test_lines + task.calibration_lines(CALIBRATION_SAMPLES)}
    images, labels = task.preprocess(render_lines(CLS_TRAIN_LINES, TRAIN_SEED, exclude=exclude))
    inputs = _single_input(task, images)
    loss = classification_loss(labels, probabilities=True, teacher=_teacher(task, inputs, distill))
    return Setting(task, inputs, (0.5,), Recipe(epochs, 3e-4), loss, _classifier_label(distill))


def _minilm(epochs: int, scratch_epochs: int, distill: bool) -> Setting:
    """Distillation only (no labels): ``distill`` and ``scratch_epochs`` do not apply."""
    task = MiniLMTask()
    exclude = {*task.test_sentences, *task.calibration_sentences(CALIBRATION_SAMPLES)}
    inputs = tokenize(task.tokenizer, generate_sentences(MINILM_TRAIN_SENTENCES, TRAIN_SEED, exclude), SEQ_LEN)
    return Setting(task, inputs, (0.5,), Recipe(epochs, 1e-4), None, "spa-prune distill")


SETTINGS = {"digits": _digits, "cls": _cls, "minilm": _minilm}


def _run_setting(name: str, setting: Setting, folder: Path, seed: int, data_free: bool = False) -> list[dict]:
    """The rows of one task; ``data_free``: pruned without calibration data and distilled without
    training data (the shipped sentences), where the task distils."""
    task = setting.task
    source, shapes = task.source()
    before = task.metrics(source)
    calibration = None if data_free else task.calibration(folder / f"{name}_calib.npz", CALIBRATION_SAMPLES)
    rows = []

    def row(target: float, path: str, epochs: int, metrics: dict[str, float], seconds: float, achieved: float) -> None:
        main_metric, *others = task.metric_names
        accuracy = metrics[main_metric]
        rows.append({"task": name, "flops": target, "achieved": achieved, "path": path, "epochs": epochs,
                     "accuracy": accuracy, "of_unpruned": accuracy / before[main_metric], "seconds": seconds,
                     "torch_pruning": setting.reference.get(target, float("nan")),
                     "others": ", ".join(f"{metric} {metrics[metric]:.3f}" for metric in others)})
        print(f"{name} {target} {path}: {accuracy:.4f} ({seconds:.0f} s)", flush=True)

    row(1.0, "unpruned", 0, before, 0.0, 1.0)
    for target in setting.targets:
        config = PruneConfig(flops=target, input_shapes=shapes, calibration=str(calibration) if calibration else None,
                             bench_runs=0, round_to=task.round_to, seed=seed)
        pruned = folder / f"{name}_{target}.onnx"
        achieved = prune(source, pruned, config).flops_ratio
        row(target, "pruned", 0, task.metrics(pruned), 0.0, achieved)
        started = time.perf_counter()
        tuned = folder / f"{name}_{target}_tuned.onnx"
        if setting.finetune_loss is None:
            data = None if data_free else folder / f"{name}_train.npz"
            if data is not None:
                np.savez(data, **setting.inputs)
            distill_pruned(pruned, source, data, tuned, setting.finetune.epochs, setting.finetune.learning_rate, seed,
                           input_shapes=shapes if data is None else None)  # the task's sequence length
        else:
            module = train(to_torch(pruned), setting.inputs, setting.finetune_loss, setting.finetune, seed)
            export_module(module, onnx.load(str(pruned)), setting.inputs, tuned)
        no_data = data_free and setting.finetune_loss is None
        label = f"{setting.finetune_label}, no data" if no_data else setting.finetune_label
        row(target, label, setting.finetune.epochs, task.metrics(tuned), time.perf_counter() - started,
            achieved)
        if setting.scratch is not None:
            fresh = folder / f"{name}_{target}_fresh.onnx"
            fresh_ratio = prune(source, fresh, dataclasses.replace(config, reinit=True)).flops_ratio
            started = time.perf_counter()
            module = train(to_torch(fresh), setting.inputs, setting.scratch_loss, setting.scratch, seed)
            trained, _ = export_module(module, onnx.load(str(fresh)), setting.inputs, folder / f"{name}_{target}_scratch.onnx")
            row(target, "from scratch (--reinit)", setting.scratch.epochs, task.metrics(trained),
                time.perf_counter() - started, fresh_ratio)
    return rows


COLUMNS = [("task", "task", "8s"), ("flops", "--flops", "7.2f"), ("achieved", "FLOPs", "5.3f"), ("path", "path", "24s"), ("epochs", "epochs", "6d"),
           ("accuracy", "accuracy", "8.4f"), ("of_unpruned", "/unpruned", "9.3f"), ("seconds", "train s", "7.0f"),
           ("torch_pruning", "TP L2+3ep", "9.3f"), ("others", "other metrics", "s")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,cls", help="comma-separated: digits, cls, minilm")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--scratch-epochs", type=int, default=DEFAULT_EPOCHS,
                        help="epochs from scratch (digits; 0: skip)")
    parser.add_argument("--flops", default=None, help="comma-separated targets instead of the tasks' own")
    parser.add_argument("--distill", action="store_true", help="distil from the unpruned ONNX model's outputs (minilm always does)")
    parser.add_argument("--data-free", action="store_true",
                        help="prune without calibration data; minilm is then distilled without training data "
                             "(the sentences that ship with spa-prune)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.tasks.split(","):
            setting = SETTINGS[name](args.epochs, args.scratch_epochs, args.distill)
            if args.flops:
                setting.targets = tuple(float(v) for v in args.flops.split(","))
            rows += _run_setting(name, setting, Path(folder), args.seed, args.data_free)
    print_table(rows, COLUMNS)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
