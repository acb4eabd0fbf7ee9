"""The exception hierarchy of spa-prune.

Every error a user can cause is a :class:`SpaError` whose message is one sentence saying what
is wrong and what to do. The CLI prints that sentence and exits non-zero; only ``--debug``
shows a traceback.
"""

from __future__ import annotations

__all__ = [
    "SpaError",
    "InputError",
    "ModelError",
    "UnsupportedModelError",
    "TargetError",
    "OutputError",
    "VerificationError",
    "first_line",
]


class SpaError(Exception):
    """Base class of all errors spa-prune reports to its user."""


class InputError(SpaError):
    """The input file is missing, unreadable, or not an ONNX model."""


class ModelError(SpaError):
    """The model is valid ONNX but something the compiler needs is missing (e.g. a shape)."""


class UnsupportedModelError(SpaError):
    """The model is of a kind spa-prune does not prune (e.g. quantized)."""


class TargetError(SpaError):
    """The pruning target cannot be met, or the options contradict each other."""


class OutputError(SpaError):
    """The output cannot be written."""


class VerificationError(SpaError):
    """The pruned model failed verification; nothing was written."""


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (onnxruntime's run over many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
