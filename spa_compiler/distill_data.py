"""What distillation trains on, checked without PyTorch (:mod:`spa_compiler.torch.distill`).

The paths, the teacher's interface against the pruned model's, and the samples (``--data`` or the
shipped English sentences) are all checked here, with onnxruntime alone, so that ``spa-prune
distill`` refuses input that does not fit before it imports PyTorch (under 3 s, not 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import cast_exactly, read_arrays
from .errors import InputError
from .ir import load_model
from .known_text import SHIPPED, VOCABULARIES, known_text, shipped_shape
from .model_files import check_input_path, check_output_path
from .shapes import declared_batch
from .synthetic import synthetic_calibration

__all__ = ["DistillData", "HELD_OUT_SHARE", "distillation_data", "onnx_session"]

HELD_OUT_SHARE = 1 / 8  # of the samples, set aside to decide whether the distilled model is better


@dataclass(frozen=True)
class DistillData:
    """The checked models and samples of one distillation: ``train`` and ``test`` (the last
    ``HELD_OUT_SHARE``) keyed by input name, cast to the inputs' types; ``source`` the ``--data``
    path or ``SHIPPED``."""

    pruned: Path
    teacher: Path
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    source: str


def distillation_data(pruned: str | Path, teacher: str | Path, data: str | Path | None, output: str | Path,
                      input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> DistillData:
    """The samples to distil the model at ``pruned`` on, toward the one at ``teacher``, writing
    ``output``: the arrays in ``data`` (an ``.npz`` or a folder of ``.npy``, as ``--calib``), or
    without it the shipped English sentences for a model of a vocabulary spa-prune recognises
    (``input_shapes`` binding its free axes). Raises :class:`~spa_compiler.errors.InputError`,
    naming the option, for paths, models or samples that do not fit."""
    pruned, teacher, output = Path(pruned), Path(teacher), Path(output)
    for path in (pruned, teacher):
        check_input_path(path)
    check_output_path(output, pruned)
    inputs = onnx_session(pruned).get_inputs()
    teacher_inputs = onnx_session(teacher).get_inputs()
    batch = declared_batch(onnx.load(str(pruned), load_external_data=False)) or 1
    if _signature(teacher_inputs) != _signature(inputs):
        raise InputError(f"--teacher {teacher} takes {_described(teacher_inputs)}, {pruned} takes "
                         f"{_described(inputs)}: give the model {pruned.name} was pruned from")
    if data is not None and input_shapes:
        raise InputError("--input-shape is for the shipped sentences; with --data the arrays' shapes are the inputs'")
    given = read_arrays(data, [i.name for i in inputs], "--data") if data is not None else \
        _shipped_sentences(teacher, teacher_inputs, input_shapes or {}, seed)
    arrays = {i.name: _checked(i, array, data) for i, array in zip(inputs, given.values())}
    count = len(next(iter(arrays.values())))
    held_out = max(1, int(count * HELD_OUT_SHARE))
    if count - held_out < max(2, batch):
        raise InputError(f"--data {data}: {count} samples, {count - held_out} to train on once the last {HELD_OUT_SHARE:.1%} "
                         f"are held out; distillation needs at least {max(2, batch)}"
                         + (f" (the model declares a batch of {batch})" if batch > 2 else "") + ": give more samples")
    return DistillData(pruned, teacher, {name: array[:-held_out] for name, array in arrays.items()},
                       {name: array[-held_out:] for name, array in arrays.items()},
                       str(data) if data is not None else SHIPPED)


def onnx_session(path: Path) -> ort.InferenceSession:
    """A CPU session of the model at ``path``, or an error naming the file."""
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise InputError(f"{path}: onnxruntime cannot load it ({' '.join(str(exc).split())[:300]})") from None


def _shipped_sentences(teacher: Path, inputs: Sequence[ort.NodeArg], bound: dict[str, tuple[int, ...]],
                       seed: int) -> dict[str, np.ndarray]:
    """The English sentences that ship with spa-prune as inputs of ``teacher``
    (:func:`~spa_compiler.known_text.known_text`; shapes as ``bound`` gives them, else axes after
    the first that the model leaves free bound to the longest sentence), or an error saying
    ``--data`` is needed."""
    count, length = shipped_shape()
    batch = declared_batch(onnx.load(str(teacher), load_external_data=False)) or 1
    shapes = {i.name: (batch, *(size if isinstance(size, int) and size > 0 else length for size in i.shape[1:]))
              for i in inputs}
    shapes.update({name: (batch, *shape[1:]) for name, shape in bound.items()})
    graph = load_model(teacher, shapes)
    text = known_text(graph, synthetic_calibration(graph, count, seed)[0])
    if text is None:
        raise InputError(f"--data is needed: spa-prune has text of its own only for models of the "
                         f"{' or '.join(v.name for v in VOCABULARIES)} vocabulary, and {teacher.name}'s inputs "
                         "are not read by such an embedding table")
    return {i.name: text.data[i.name] for i in inputs}


def _signature(inputs: Sequence[ort.NodeArg]) -> dict[str, tuple[str, int]]:
    """Per input its type and rank (pruning keeps both; sizes may be bound or freed)."""
    return {i.name: (i.type, len(i.shape)) for i in inputs}


def _described(inputs: Sequence[ort.NodeArg]) -> str:
    return ", ".join(f"{i.name} ({i.type}, {len(i.shape)} axes)" for i in inputs)


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _checked(declared: ort.NodeArg, array: np.ndarray, data: str | Path | None) -> np.ndarray:
    """``array`` cast to the input's type (only if that keeps its values), after checking its
    shape against the declared one (fixed sizes past the samples' axis must match)."""
    shape = declared.shape
    fixed = [isinstance(size, int) and size != array.shape[k] for k, size in enumerate(shape[1:], 1)] \
        if array.ndim == len(shape) else [True]
    if any(fixed):
        raise InputError(f"--data {data}: array '{declared.name}' has shape {array.shape}; the model takes "
                         f"{tuple(shape)} (first axis: samples)")
    if declared.type not in _NUMPY_TYPES:
        raise InputError(f"--data {data}: input '{declared.name}' is {declared.type}, which distillation does not feed")
    return cast_exactly(array, np.dtype(_NUMPY_TYPES[declared.type]), f"--data {data}: array '{declared.name}'")
