"""``--eval FILE.py``: the user's own task metric, computed on the original and the pruned model.

The file defines ``score(model_path: str) -> float`` (higher is better), e.g. the accuracy of the
model at ``model_path`` on the user's validation set. It runs in this process, on the input
model and on the written pruned model, and both figures go in the report.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

from .errors import InputError
from .pipeline import Pass
from .state import PruneState

__all__ = ["load_score_function", "scored", "Evaluate"]


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


def scored(score: Callable[[str], float], model: Path, which: str) -> float:
    """``score(model)`` as a float; one clear error when it fails or is not finite."""
    try:
        value = float(score(str(model)))
    except Exception as exc:
        raise InputError(f"--eval: score() failed on the {which} model ({type(exc).__name__}: {exc})") from None
    if not math.isfinite(value):
        raise InputError(f"--eval: score() returned {value} for the {which} model; it must return a finite number")
    return value


class Evaluate(Pass):
    """Score the input and the written pruned model with the user's metric."""

    name, description = "evaluate", "scoring the original and pruned models with --eval"
    requires, provides = ("source", "output"), ("eval_before", "eval_after")

    def __init__(self, script: str | Path) -> None:
        self.score = load_score_function(script)

    def run(self, state: PruneState) -> PruneState:
        """The original is scored unless an earlier step did (a sweep scores it once for all points)."""
        if state.eval_before is None:
            state.eval_before = scored(self.score, state.source, "original")
        state.eval_after = scored(self.score, state.output, "pruned")
        return state
