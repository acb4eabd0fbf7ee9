"""``--eval FILE.py``: the user's own task metric, computed on the original and the pruned model.

The file defines ``score(model_path: str) -> float`` (higher is better), e.g. the accuracy of the
model at ``model_path`` on the user's validation set. It runs in this process, on the input
model and on the written pruned model, and both figures go in the report. The input model is
scored first, before anything is pruned, so that a script that cannot score it fails in seconds
and writes nothing; a script that fails only on the pruned model leaves that model written, and
the error says where.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

from .errors import InputError
from .pipeline import Pass
from .state import PruneState

__all__ = ["load_score_function", "scored", "EvaluateOriginal", "Evaluate"]


def load_score_function(path: str | Path) -> Callable[[str], float]:
    """The ``score`` function defined by the Python file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--eval {path}: no such file; give a Python file defining score(model_path) -> float")
    spec = importlib.util.spec_from_file_location(f"spa_prune_eval_{path.stem}", path)
    if spec is None or path.suffix != ".py":
        raise InputError(f"--eval {path} is not a Python file (.py); give one defining score(model_path) -> float")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"--eval {path} could not be loaded ({type(exc).__name__}: {exc})") from None
    score = getattr(module, "score", None)
    if not callable(score):
        raise InputError(f"--eval {path} defines no function score(model_path) -> float")
    return score


def scored(score: Callable[[str], float], model: Path, which: str, aftermath: str = "") -> float:
    """``score(model)`` as a float; one clear error when it fails or is not finite (``aftermath``,
    if given, is appended to it: what the failure leaves behind)."""
    try:
        value = float(score(str(model)))
    except Exception as exc:
        raise InputError(f"--eval: score() failed on the {which} model ({type(exc).__name__}: {exc}){aftermath}") from None
    if not math.isfinite(value):
        raise InputError(f"--eval: score() returned {value} for the {which} model; it must return a finite number"
                         f"{aftermath}")
    return value


class EvaluateOriginal(Pass):
    """Score the input model with the user's metric, before any work is done on it."""

    name, description = "evaluate original", "scoring the original model with --eval"
    requires, provides = ("source",), ("eval_before",)

    def __init__(self, script: str | Path) -> None:
        self.score = load_score_function(script)

    def run(self, state: PruneState) -> PruneState:
        state.eval_before = scored(self.score, state.source, "original")
        return state


class Evaluate(Pass):
    """Score the written pruned model with the user's metric (the original was scored by
    :class:`EvaluateOriginal`, or once for all points of a sweep)."""

    name, description = "evaluate", "scoring the pruned model with --eval"
    requires, provides = ("eval_before", "output"), ("eval_after",)

    def __init__(self, script: str | Path) -> None:
        self.score = load_score_function(script)

    def run(self, state: PruneState) -> PruneState:
        state.eval_after = scored(self.score, state.output, "pruned",
                                  f"; the pruned model is written to {state.output}, unscored")
        return state
