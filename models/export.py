"""Export PyTorch models to ONNX (classic TorchScript exporter unless asked otherwise) and verify the result."""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .zoo import ARCHITECTURES

__all__ = ["TOLERANCE", "ExportVerificationError", "export_architecture", "export_checked", "export_onnx", "verify_onnx"]

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
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    input_dtype: str = "float32",
) -> pathlib.Path:
    """Export ``model`` (put in eval mode) to ``path`` with input "input" and output "output".

    The seeded sample input has ``input_shape`` and the torch dtype named ``input_dtype``;
    integer inputs are token ids in ``[0, n)``, ``n`` the size of the model's first
    ``nn.Embedding``.  ``dynamic_axes`` maps "input"/"output" to ``{axis: label}`` as in
    ``torch.onnx.export``; ``dynamic_batch`` adds axis 0 "batch" to both.  Checked as by
    ``export_checked``, and also run on a sample with the dynamic input axes resized
    (size 1 -> 2, n -> n // 2) when there are any.
    """
    axes = {name: dict(named) for name, named in (dynamic_axes or {}).items()}
    if dynamic_batch:
        for name in ("input", "output"):
            axes.setdefault(name, {}).setdefault(0, "batch")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, input_dtype)
    sample = _sample_input(model, input_shape, dtype, generator)
    export_checked(model, {"input": sample}, path, opset, dynamic_axes=axes or None)
    resizable = axes.get("input", {})
    if resizable:
        resized = tuple((2 if n == 1 else n // 2) if axis in resizable else n for axis, n in enumerate(input_shape))
        verify_onnx(model, path, {"input": _sample_input(model, resized, dtype, generator)})
    return pathlib.Path(path)


def export_checked(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    opset: int = 17,
    output_names: Sequence[str] = ("output",),
    dynamo: bool = False,
    **options: Any,
) -> pathlib.Path:
    """``torch.onnx.export`` the eval-mode ``model`` called as ``model(*inputs.values())``, then check it.

    ONNX inputs are named after the keys of ``inputs``; ``options`` go to ``torch.onnx.export``
    (``dynamic_axes``, or ``dynamic_shapes``/``external_data`` with ``dynamo=True``).  The file
    is checked with ``onnx.checker`` (full check) and verified with ``verify_onnx`` on ``inputs``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        for message in _EXPORTER_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(
            model,
            tuple(inputs.values()),
            str(path),
            dynamo=dynamo,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(output_names),
            **{"verbose": False, **options},
        )
    onnx.checker.check_model(str(path), full_check=True)
    verify_onnx(model, path, inputs)
    return path


def _sample_input(
    model: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if embedding is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding to bound its {dtype} token-id input")
    return torch.randint(0, embedding.num_embeddings, shape, generator=generator, dtype=dtype)


def verify_onnx(model: torch.nn.Module, path: str | os.PathLike[str], inputs: Mapping[str, torch.Tensor]) -> None:
    """Compare the ONNX model's first output with ``model(*inputs.values())`` (its first) on onnxruntime.

    ``inputs`` maps the ONNX input names to tensors, in the order of ``model``'s arguments.
    Raises ``ExportVerificationError`` on a shape mismatch or a difference above ``TOLERANCE``.
    """
    with torch.no_grad():
        expected = model(*inputs.values())
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
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
    return export_onnx(spec.builder(), spec.input_shape, path, opset, input_dtype=spec.input_dtype)
