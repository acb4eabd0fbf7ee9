"""The interface of an accuracy task: a real model, its test data with ground truth, and calibration data.

A task owns one ONNX source model and builds its data deterministically from fixed seeds;
calibration samples never overlap the test samples.  To iterate on one model::

    task = TASKS["rec"]                                  # models.accuracy_benchmark.TASKS
    source, shapes = task.source()                       # ONNX path, {input: static shape}
    calib = task.calibration(folder / "calib.npz", 128)  # .npz keyed by input name, axis 0 = samples
    prune(source, "small.onnx", PruneConfig(flops=0.5, criterion="obs", calibration=str(calib),
                                            input_shapes=shapes, round_to=task.round_to))
    task.evaluate("small.onnx")                          # the task metric of the pruned file

Files a task makes (exports, trained models) live in a temporary folder owned by the task
instance and removed with it.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

__all__ = ["Shapes", "Task", "run_batched", "write_calibration"]

Shapes = dict[str, tuple[int, ...]]


class Task(ABC):
    """A model with a task metric.  ``metric_names[0]`` is the one ``evaluate`` returns."""

    name: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    default_test_samples: ClassVar[int]
    round_to: ClassVar[int] = 8
    """``PruneConfig.round_to`` suited to the model's channel widths."""
    torch_pruning: ClassVar[bool] = False
    """Whether ``torch_prune`` is available (the model exists as a PyTorch module)."""
    attention: ClassVar[bool] = False
    """Whether the model has attention heads (whose dimensions spa-prune rotates and prunes)."""
    tokens: ClassVar[bool] = False
    """Whether the model reads token ids (calibration sentences get copies, data-free runs read text)."""

    def __init__(self, test_samples: int | None = None) -> None:
        self.test_samples = test_samples or self.default_test_samples

    @cached_property
    def folder(self) -> Path:
        self._tempdir = tempfile.TemporaryDirectory(prefix=f"spa_{self.name}_")
        return Path(self._tempdir.name)

    @property
    @abstractmethod
    def description(self) -> str:
        """One line: the model, the test data and the metric."""

    @abstractmethod
    def source(self) -> tuple[Path, Shapes]:
        """The ONNX model to prune and the static input shapes to bind (batch 1)."""

    @abstractmethod
    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        """``samples`` calibration inputs keyed by input name (axis 0 = samples), disjoint from the test data."""

    @abstractmethod
    def metrics(self, path: str | Path) -> dict[str, float]:
        """Every metric of ``metric_names`` for the ONNX model at ``path`` on the test data."""

    def evaluate(self, path: str | Path) -> float:
        """The task's main metric (``metric_names[0]``) of the model at ``path``."""
        return self.metrics(path)[self.metric_names[0]]

    def calibration(self, path: str | Path, samples: int) -> Path:
        """Write ``calibration_inputs(samples)`` to the ``.npz`` at ``path`` (the format of
        ``PruneConfig.calibration``) and return the path."""
        return write_calibration(path, self.calibration_inputs(samples))

    def torch_prune(self, ratio: float, output: Path) -> Path:
        """Prune the PyTorch model with Torch-Pruning at ``ratio`` and export it to ``output``."""
        raise NotImplementedError(f"no PyTorch model for task '{self.name}'")


def write_calibration(path: str | Path, inputs: dict[str, np.ndarray]) -> Path:
    """Save arrays keyed by input name to an uncompressed ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **inputs)
    return path


def run_batched(path: str | Path, inputs: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    """The first output of the ONNX model at ``path`` on ``inputs`` (axis 0 = samples) with
    onnxruntime on the CPU, ``batch`` samples per call (one when the model's batch axis is fixed
    to 1), concatenated."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = 1 if session.get_inputs()[0].shape[0] == 1 else batch
    names = [node.name for node in session.get_inputs()]
    count = len(next(iter(inputs.values())))
    outputs = [session.run(None, {name: inputs[name][start : start + step] for name in names})[0]
               for start in range(0, count, step)]
    return np.concatenate(outputs)
