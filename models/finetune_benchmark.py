"""Benchmark: prune, then fine-tune in PyTorch (or train the pruned architecture from scratch), export, measure.

    python -m models.finetune_benchmark [--tasks digits,cls] [--epochs 3] [--distill]
        [--scratch-epochs 15] [--json results.json]

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

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from spa_compiler import PruneConfig, prune
from spa_compiler.torch import to_torch

from .digits import BATCH_SIZE, DEFAULT_EPOCHS, LEARNING_RATE, load_digits_split
from .digits_task import DigitsTask
from .ocr_tasks import ClsTask
from .table import print_table, write_json
from .tasks import Task, run_batched
from .text_render import render_lines

__all__ = ["Recipe", "train", "export_trained", "main"]

TRAIN_SEED = 2
CLS_TRAIN_LINES = 2000
CALIBRATION_SAMPLES = 128
TEMPERATURE = 2.0


@dataclass(frozen=True)
class Recipe:
    """How to train: ``epochs`` of AdamW at ``learning_rate`` (cosine decay to 0, or one-cycle when
    ``one_cycle``); ``probabilities``: the model outputs a softmax, not logits."""

    epochs: int
    learning_rate: float
    probabilities: bool = False
    one_cycle: bool = False
    distill: bool = False


def _log_probabilities(outputs: torch.Tensor, probabilities: bool, temperature: float = 1.0) -> torch.Tensor:
    if probabilities:
        return torch.log(outputs.clamp_min(1e-8))
    return F.log_softmax(outputs / temperature, dim=1)


def train(module: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray, recipe: Recipe,
          teacher: np.ndarray | None = None, seed: int = 0) -> torch.nn.Module:
    """Train ``module`` (``inputs[i] -> labels[i]``, classes on axis 1) by ``recipe``; with
    ``teacher`` outputs the loss mixes in KL(teacher || student) (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels).long()
    soft = torch.from_numpy(teacher) if teacher is not None else None
    steps = recipe.epochs * math.ceil(len(x) / BATCH_SIZE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=steps)
                if recipe.one_cycle else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
    module.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            if len(index) < 2:  # BatchNorm in train mode needs two samples
                continue
            outputs = module(x[index])
            loss = F.nll_loss(_log_probabilities(outputs, recipe.probabilities), y[index])
            if soft is not None:
                t = 1.0 if recipe.probabilities else TEMPERATURE
                target = soft[index] if recipe.probabilities else F.softmax(soft[index] / t, dim=1)
                student = _log_probabilities(outputs, recipe.probabilities, t)
                loss = 0.5 * loss + 0.5 * t * t * F.kl_div(student, target, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return module.eval()


def export_trained(module: torch.nn.Module, reference: Path, sample: np.ndarray, path: Path) -> Path:
    """``torch.onnx.export`` with the input and output names of the ONNX model at ``reference``
    and a dynamic batch axis."""
    graph = onnx.load(str(reference)).graph
    initializers = {t.name for t in graph.initializer}
    input_name = next(i.name for i in graph.input if i.name not in initializers)
    output_name = graph.output[0].name
    with torch.no_grad():
        torch.onnx.export(module, (torch.from_numpy(sample),), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    return path


@dataclass
class Setting:
    """One task of the benchmark: its data, how to fine-tune and how to train from scratch."""

    task: Task
    inputs: np.ndarray
    labels: np.ndarray
    targets: tuple[float, ...]
    finetune: Recipe
    scratch: Recipe | None
    reference: dict[float, float]


def _digits(epochs: int, scratch_epochs: int, distill: bool) -> Setting:
    x_train, _, y_train, _ = load_digits_split()
    scratch = Recipe(scratch_epochs, LEARNING_RATE, one_cycle=True) if scratch_epochs else None
    return Setting(DigitsTask(), x_train.astype(np.float32), y_train, (0.5, 0.3),
                   Recipe(epochs, 1e-3, distill=distill), scratch, {0.5: 0.997, 0.3: 0.994})


def _cls(epochs: int, scratch_epochs: int, distill: bool) -> Setting:
    task = ClsTask()
    exclude = {line.text for line in task.test_lines + task.calibration_lines(CALIBRATION_SAMPLES)}
    images, labels = task.preprocess(render_lines(CLS_TRAIN_LINES, TRAIN_SEED, exclude=exclude))
    return Setting(task, images.astype(np.float32), labels, (0.5,),
                   Recipe(epochs, 3e-4, probabilities=True, distill=distill), None, {})


SETTINGS = {"digits": _digits, "cls": _cls}


def _run_setting(name: str, setting: Setting, folder: Path, seed: int) -> list[dict]:
    task = setting.task
    source, shapes = task.source()
    before = task.evaluate(source)
    calibration = task.calibration(folder / f"{name}_calib.npz", CALIBRATION_SAMPLES)
    teacher = run_batched(source, {next(iter(shapes)): setting.inputs}) if setting.finetune.distill else None
    sample = setting.inputs[:2]
    rows = []

    def row(target: float, path: str, epochs: int, model: Path, seconds: float, achieved: float) -> None:
        accuracy = task.evaluate(model)
        rows.append({"task": name, "flops": target, "achieved": achieved, "path": path, "epochs": epochs,
                     "accuracy": accuracy,
                     "of_unpruned": accuracy / before, "seconds": seconds,
                     "torch_pruning": setting.reference.get(target, float("nan"))})
        print(f"{name} {target} {path}: {accuracy:.4f} ({seconds:.0f} s)", flush=True)

    rows.append({"task": name, "flops": 1.0, "achieved": 1.0, "path": "unpruned", "epochs": 0, "accuracy": before,
                 "of_unpruned": 1.0, "seconds": 0.0, "torch_pruning": float("nan")})
    for target in setting.targets:
        config = PruneConfig(flops=target, input_shapes=shapes, calibration=str(calibration), bench_runs=0,
                             round_to=task.round_to, seed=seed)
        pruned = folder / f"{name}_{target}.onnx"
        achieved = prune(source, pruned, config).flops_ratio
        row(target, "pruned", 0, pruned, 0.0, achieved)
        started = time.perf_counter()
        module = train(to_torch(pruned), setting.inputs, setting.labels, setting.finetune, teacher, seed)
        tuned = export_trained(module, pruned, sample, folder / f"{name}_{target}_tuned.onnx")
        kind = "fine-tuned + distilled" if teacher is not None else "fine-tuned"
        row(target, kind, setting.finetune.epochs, tuned, time.perf_counter() - started, achieved)
        if setting.scratch is not None:
            fresh = folder / f"{name}_{target}_fresh.onnx"
            fresh_ratio = prune(source, fresh, dataclasses.replace(config, reinit=True)).flops_ratio
            started = time.perf_counter()
            module = train(to_torch(fresh), setting.inputs, setting.labels, setting.scratch, None, seed)
            trained = export_trained(module, fresh, sample, folder / f"{name}_{target}_scratch.onnx")
            row(target, "from scratch (--reinit)", setting.scratch.epochs, trained, time.perf_counter() - started,
                fresh_ratio)
    return rows


COLUMNS = [("task", "task", "8s"), ("flops", "--flops", "7.2f"), ("achieved", "FLOPs", "5.3f"), ("path", "path", "24s"), ("epochs", "epochs", "6d"),
           ("accuracy", "accuracy", "8.4f"), ("of_unpruned", "/unpruned", "9.3f"), ("seconds", "train s", "7.0f"),
           ("torch_pruning", "TP L2+3ep", "9.3f")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,cls", help="comma-separated: digits, cls")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--scratch-epochs", type=int, default=DEFAULT_EPOCHS,
                        help="epochs from scratch (digits; 0: skip)")
    parser.add_argument("--flops", default=None, help="comma-separated targets instead of the tasks' own")
    parser.add_argument("--distill", action="store_true", help="distil from the unpruned ONNX model's outputs")
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
            rows += _run_setting(name, setting, Path(folder), args.seed)
    print_table(rows, COLUMNS)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
