"""Export PyTorch models to ONNX with the classic (TorchScript) exporter and verify the result."""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .zoo import ARCHITECTURES

__all__ = ["TOLERANCE", "ExportVerificationError", "export_architecture", "export_onnx"]

TOLERANCE = 1e-4
"""Absolute and relative tolerance between onnxruntime and torch outputs."""

# Deprecation notices emitted by torch.onnx.export(dynamo=False) itself; they are not about our models.
_EXPORTER_DEPRECATIONS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed",
)


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the torch model's output."""


def export_onnx(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str],
    opset: int = 17,
    dynamic_batch: bool = False,
) -> pathlib.Path:
    """Export ``model`` (put in eval mode) to ``path`` with input "input" and output "output".

    The file is checked with ``onnx.checker`` (full check) and run with onnxruntime on a
    seeded random input (batch 2 when ``dynamic_batch``); raises
    ``ExportVerificationError`` if outputs differ by more than ``TOLERANCE``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(input_shape, generator=generator)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        for message in _EXPORTER_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    if dynamic_batch:
        sample = torch.randn((2, *input_shape[1:]), generator=generator)
    _verify(model, path, sample)
    return path


def _verify(model: torch.nn.Module, path: pathlib.Path, sample: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(sample).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input": sample.numpy()})
    if actual.shape != expected.shape:
        raise ExportVerificationError(f"{path}: onnxruntime shape {actual.shape} != torch shape {expected.shape}")
    if not np.allclose(actual, expected, rtol=TOLERANCE, atol=TOLERANCE):
        diff = float(np.abs(actual - expected).max())
        raise ExportVerificationError(f"{path}: onnxruntime differs from torch by up to {diff:.3g}")


def export_architecture(name: str, path: str | os.PathLike[str], opset: int = 17) -> pathlib.Path:
    """Build the registered architecture ``name`` with default arguments and export it."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    return export_onnx(spec.builder(), spec.input_shape, path, opset)
