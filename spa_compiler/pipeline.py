"""Passes and the pipeline that runs them (the default pipelines are in :mod:`spa_compiler.api`).

A pass is an object with a ``name`` that takes the :class:`~spa_compiler.state.PruneState` and
returns it (``__call__(state) -> state``). :class:`Pass` adds declared ``requires`` (state fields
that must be filled before it runs) and ``provides`` (fields it fills), checked around ``run``.
A :class:`Pipeline` runs passes in order, times each into ``state.timings`` (and records the
process's peak resident memory after each into ``state.peak_mb``), reports progress,
and when a pass fails with anything but a user-facing :class:`SpaError`, raises a
:class:`PipelineError` naming that pass and the passes that ran before it::

    from spa_compiler import Pipeline, PruneConfig, PruneState, default_passes, load_model

    passes = default_passes(PruneConfig(flops=0.5))
    state = Pipeline(passes).until("allocate")(PruneState(PruneConfig(flops=0.5), graph=load_model("m.onnx")))
    print(state.plan.achieved)
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Iterable, Protocol

from .errors import SpaError
from .state import Progress, PruneState

__all__ = ["Pass", "PassLike", "Pipeline", "PipelineError", "peak_resident_mb"]


def peak_resident_mb() -> float:
    """The peak resident memory of this process so far, in MB: Linux's ``VmHWM`` (of this
    process image alone), else ``ru_maxrss`` (kilobytes on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PassLike(Protocol):
    name: str

    def __call__(self, state: PruneState) -> PruneState: ...


class PipelineError(RuntimeError):
    """A pass failed with an unexpected error (a bug, not a user mistake)."""

    def __init__(self, pass_name: str, completed: list[str], cause: BaseException) -> None:
        after = f" (after {', '.join(completed)})" if completed else " (the first pass)"
        super().__init__(f"pass '{pass_name}' failed{after}: {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.completed = completed


class Pass:
    """Base class of a pass with declared inputs and outputs (state field names)."""

    name = ""
    description = ""  # the progress line shown while it runs
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, state: PruneState) -> PruneState:
        raise NotImplementedError

    def __call__(self, state: PruneState) -> PruneState:
        missing = [f for f in self.requires if getattr(state, f) is None]
        if missing:
            raise ValueError(f"needs {', '.join(missing)} in the state; run the passes that provide it first")
        state = self.run(state)
        unfilled = [f for f in self.provides if getattr(state, f) is None]
        if unfilled:
            raise ValueError(f"did not provide {', '.join(unfilled)}")
        return state


def _name(step: PassLike) -> str:
    return getattr(step, "name", "") or getattr(step, "__name__", type(step).__name__)


class Pipeline:
    """Passes run in order; each is timed, announced and, when it fails, named."""

    def __init__(self, passes: Iterable[PassLike], progress: Progress | None = None) -> None:
        self.passes = list(passes)
        self.progress = progress

    @property
    def names(self) -> list[str]:
        return [_name(p) for p in self.passes]

    def __call__(self, state: PruneState) -> PruneState:
        if self.progress is not None:
            state.progress = self.progress
        completed: list[str] = []
        for step in self.passes:
            name = _name(step)
            state.note(getattr(step, "description", "") or name)
            start = time.perf_counter()
            try:
                state = step(state)
            except (SpaError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise PipelineError(name, completed, exc) from exc
            state.timings[name] = state.timings.get(name, 0.0) + time.perf_counter() - start
            state.peak_mb[name] = peak_resident_mb()
            completed.append(name)
        return state

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"no pass '{name}' in this pipeline ({', '.join(self.names)})")
        return self.names.index(name)

    def until(self, name: str) -> Pipeline:
        """The passes up to and including ``name``."""
        return Pipeline(self.passes[: self._index(name) + 1], self.progress)

    def insert_after(self, name: str, step: PassLike) -> Pipeline:
        at = self._index(name) + 1
        return Pipeline([*self.passes[:at], step, *self.passes[at:]], self.progress)

    def replace(self, name: str, step: PassLike) -> Pipeline:
        at = self._index(name)
        return Pipeline([*self.passes[:at], step, *self.passes[at + 1:]], self.progress)
