"""Latency measurement with onnxruntime: one thread, sequential execution, median of runs."""

from __future__ import annotations

import time

import numpy as np
import onnx

from .verify import session_for

__all__ = ["measure_latency"]


def measure_latency(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3, threads: int = 1
) -> float:
    """Median wall-clock milliseconds of one inference (after ``warmup`` runs)."""
    session = session_for(model, threads=threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
