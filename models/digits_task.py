"""The digits ResNet of ``models.digits`` and the digits ViT of ``models.digits_vit`` as accuracy
tasks: top-1 accuracy on the held-out split.

The model is trained once per task instance (seed 0, about 10 s for the ResNet, a minute for the
ViT) and exported with a dynamic batch axis.  Test images are the first ``test_samples`` of the
360 held-out ones; calibration images come from the training split.  Metric: **accuracy**, the fraction of test images whose
arg-max class is the label.  Torch-Pruning prunes the trained PyTorch model (``torch_prune``).
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path

import numpy as np
from torch import nn

from .digits import INPUT_SHAPE, load_digits_split, onnx_accuracy, train_digits_model
from .digits_vit import torch_pruning_vit, train_digits_vit
from .export import export_onnx
from .tasks import Shapes, Task

__all__ = ["DigitsTask", "DigitsViTTask", "torch_pruning_digits"]


def torch_pruning_digits(model: nn.Module, ratio: float, round_to: int) -> nn.Module:
    """A pruned copy of the digits ResNet: Torch-Pruning's global L2-magnitude channel pruning at
    ``ratio``, widths multiples of ``round_to``, the classifier's outputs kept."""
    import torch
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    classifier = [module for module in model.modules() if isinstance(module, nn.Linear)]
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(INPUT_SHAPE), importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, ignored_layers=classifier, round_to=round_to,
    )
    pruner.step()
    return model


class DigitsTask(Task):
    name = "digits"
    metric_names = ("accuracy",)
    default_test_samples = 360
    torch_pruning = True
    model_name = "digits ResNet"

    @property
    def description(self) -> str:
        return f"{self.model_name} (scikit-learn 8x8 digits), top-1 accuracy on {len(self._split[3])} held-out images"

    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x_train, x_test, y_train, y_test = load_digits_split()
        return x_train, x_test[: self.test_samples], y_train, y_test[: self.test_samples]

    @cached_property
    def _model(self) -> nn.Module:
        return train_digits_model()[0]

    @cached_property
    def _source(self) -> Path:
        return export_onnx(self._model, INPUT_SHAPE, self.folder / f"{self.name}.onnx", opset=17, dynamic_batch=True)

    def source(self) -> tuple[Path, Shapes]:
        return self._source, {"input": INPUT_SHAPE}

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"input": np.ascontiguousarray(self._split[0][:samples], dtype=np.float32)}

    def metrics(self, path: str | Path) -> dict[str, float]:
        _, x_test, _, y_test = self._split
        return {"accuracy": onnx_accuracy(path, x_test, y_test)}

    def torch_prune(self, ratio: float, output: Path) -> Path:
        return export_onnx(self._torch_pruned(ratio), INPUT_SHAPE, output, opset=17, dynamic_batch=True)

    def _torch_pruned(self, ratio: float) -> nn.Module:
        return torch_pruning_digits(self._model, ratio, self.round_to)


class DigitsViTTask(DigitsTask):
    name = "vit"
    model_name = "digits ViT"
    attention = True

    @cached_property
    def _model(self) -> nn.Module:
        return train_digits_vit()[0]

    def _torch_pruned(self, ratio: float) -> nn.Module:
        import torch

        return torch_pruning_vit(copy.deepcopy(self._model).eval(), ratio, torch.zeros(INPUT_SHAPE))
