"""``spa-prune distill``: a pruned model trained toward its original's outputs (:mod:`spa_compiler.torch.distill`).

Dispatched from :func:`spa_compiler.cli.main`. Needs the optional PyTorch extra; pruning never does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .cli import DEBUG, console, reported_errors
from .distill_data import distillation_data
from .errors import InputError
from .known_text import shipped_shape
from .shapes import parse_input_shapes
from .token_augment import REPLACED

__all__ = ["distill_app"]

EXAMPLES = """
Examples:

  spa-prune model.onnx --flops 0.5 --calib calib.npz -o small.onnx

  spa-prune distill small.onnx --teacher model.onnx --data train.npz -o small.distilled.onnx

  spa-prune distill small.onnx --teacher model.onnx --data train.npz --epochs 5 --lr 3e-4

  spa-prune distill small_encoder.onnx --teacher encoder.onnx --epochs 10    (BERT vocabulary: shipped sentences)
"""

INSTALL = "pip install 'spa-prune[torch]' && pip install --no-deps onnx2torch==1.5.15"

distill_app = typer.Typer(add_completion=False)


@distill_app.command(help="Train PRUNED (an .onnx file spa-prune wrote) toward the outputs of the model it was "
                     "pruned from, on unlabelled inputs (--data: an .npz of the model's inputs, as --calib reads; "
                     "a model of the BERT uncased vocabulary needs none), and write it if its error on held-out "
                     "samples (the last eighth) fell; otherwise write PRUNED unchanged. Needs PyTorch: "
                     + escape(INSTALL) + EXAMPLES)
def distill(
    pruned: Path = typer.Argument(..., metavar="PRUNED", help="The pruned .onnx model (never modified).",
                                  show_default=False),
    teacher: Path = typer.Option(..., "--teacher", help="The .onnx model PRUNED was pruned from."),
    data: Optional[Path] = typer.Option(
        None, "--data", show_default=False,
        help="Inputs to train on: .npz (arrays named by input), a folder of NAME.npy, or one .npy for a model of "
             "one input. Without it, a model of the BERT uncased vocabulary trains on the English sentences that "
             "ship with spa-prune."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output path.",
                                          show_default="PRUNED.distilled.onnx"),
    epochs: int = typer.Option(3, min=1, help="Passes over the training samples."),
    learning_rate: float = typer.Option(1e-4, "--lr", min=0.0, help="AdamW learning rate, decayed to 0 on a cosine."),
    seed: int = typer.Option(0, help="Seed of the order in which the samples are drawn, and of the token copies."),
    input_shape: List[str] = typer.Option(
        [], help="Without --data: bind a free input axis for the shipped sentences, NAME=1x128 (repeatable; by "
                 f"default the longest sentence, {shipped_shape()[1]} tokens). The distilled model keeps it free "
                 "where its export runs at other lengths."),
    token_copies: bool = typer.Option(True, "--token-copies/--no-token-copies",
                                      help="Fewer than 1024 token sequences: train on copies of them too, with "
                                           f"{REPLACED:.0%} of their tokens replaced."),
    debug: bool = DEBUG,
) -> None:
    with reported_errors(debug):
        if any(importlib.util.find_spec(name) is None for name in ("torch", "onnx2torch")):
            raise InputError(f"spa-prune distill needs PyTorch and onnx2torch: {INSTALL}")
        output = output or pruned.with_name(pruned.stem + ".distilled.onnx")
        prepared = distillation_data(pruned, teacher, data, output, parse_input_shapes(input_shape), seed)
        try:  # after the checks: importing PyTorch takes seconds
            from .torch.distill import distill_checked
        except ImportError as exc:
            raise InputError(f"spa-prune distill cannot import PyTorch or onnx2torch ({exc}): {INSTALL}") from None
        columns = (TextColumn("distilling"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("distill", total=None, loss=float("nan"))

            def progress(step: int, steps: int, loss: float) -> None:
                bar.update(task, completed=step, total=steps, loss=loss)

            result = distill_checked(prepared, output, epochs, learning_rate, seed, progress, token_copies)
        console.print(escape(f"{result.summary}\nwrote {output}"))
