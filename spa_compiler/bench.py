"""Latency measurement with onnxruntime: one thread, sequential execution, median of runs.

The clock is wall time by default. ``clock=time.thread_time`` counts the CPU time of the calling
thread instead: with one thread onnxruntime computes in the thread that calls ``run``, so on an
idle machine the two agree, and on a shared one CPU time leaves out the time other processes hold
the core (the medians of two identical models agree within about 1% where wall time differs by 15%).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .verify import session_for

__all__ = ["Clock", "time_rounds", "measure_latency", "measure_latencies"]

Clock = Callable[[], float]


def time_rounds(
    sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
    min_seconds: float = 0.0, clock: Clock = time.perf_counter,
) -> list[list[float]]:
    """Seconds (by ``clock``) of every measured inference of each session. The sessions run in
    rounds, one inference of each per round, so a change of machine load affects all of them alike
    and their ratios stay steady: ``warmup`` rounds, then ``runs`` rounds, more (up to ``10 * runs``)
    while the measured rounds have taken less than ``min_seconds`` of wall time."""
    times: list[list[float]] = [[] for _ in sessions]

    def one_round() -> None:
        for session, spent in zip(sessions, times):
            start = clock()
            session.run(None, feeds)
            spent.append(clock() - start)

    for _ in range(warmup):
        one_round()
    for spent in times:
        spent.clear()
    start, done = time.perf_counter(), 0
    while done < runs or (done < 10 * runs and time.perf_counter() - start < min_seconds):
        one_round()
        done += 1
    return times


def measure_latencies(
    models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
    threads: int = 1, min_seconds: float = 0.0, clock: Clock = time.perf_counter,
) -> list[float]:
    """Median milliseconds (by ``clock``) of one inference of each model, timed in rounds
    (:func:`time_rounds`)."""
    sessions = [session_for(model, threads=threads) for model in models]
    return [float(np.median(spent) * 1e3) for spent in time_rounds(sessions, feeds, runs, warmup, min_seconds, clock)]


def measure_latency(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3, threads: int = 1
) -> float:
    """Median wall-clock milliseconds of one inference (after ``warmup`` runs)."""
    return measure_latencies([model], feeds, runs, warmup, threads)[0]
