"""Ray: a sweep's points as Ray tasks, and calibration statistics collected in shards across workers.

Ray is an optional extra (``pip install 'spa-prune[ray]'``), imported only here and only when a
sweep asks for it (``--ray``, or ``RAY_ADDRESS`` set: then the sweep joins that cluster; without
it Ray starts a local one). The work is the in-process code, shipped:

- :class:`RayEngine` runs :func:`~spa_compiler.sweep.attempt_point` as one Ray task per point.
  The state each criterion's points start from is put in the object store once. Each task writes
  its pruned model itself, so the sweep's directory must be reachable from every worker (a local
  cluster, or a shared file system) and so must the ``--eval`` script.
- :class:`ShardedStatistics` splits the calibration samples into runs of whole batches, one per
  worker, and adds up the statistics the workers return: ``H = Σ rowsᵀ rows`` is a sum over rows,
  and every batch samples its rows with its own seeded generator
  (:func:`~spa_compiler.calibrate.collect_statistics`), so the sum equals a single-process
  collection up to the order of floating-point additions (within 1e-12 relative in the tests).

The figures of a sweep on Ray therefore equal those of the same sweep in process: exactly where
no statistics are collected, and to float rounding where they are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .calibrate import ConsumerLayer, LayerStatistics, add_statistics, collect_statistics
from .config import PruneConfig
from .errors import InputError
from .ir import Graph
from .stages import CollectStatistics
from .sweep import attempt_point, prepare

__all__ = ["ray_requested", "start_ray", "RayEngine", "ShardedStatistics", "statistics_shards"]

log = logging.getLogger(__name__)

RAY_HINT = "pip install 'spa-prune[ray]'"


def ray_requested(flag: bool) -> bool:
    """Whether a sweep runs on Ray: asked for with ``--ray``, or a cluster named in ``RAY_ADDRESS``."""
    return flag or bool(os.environ.get("RAY_ADDRESS"))


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray (or RAY_ADDRESS) needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def start_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local one, unless Ray already runs here."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
                 include_dashboard=False, log_to_driver=False)


def statistics_shards(samples: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """``(first batch, batches)`` of each shard: the ``ceil(samples / batch_size)`` batches in at
    most ``shards`` runs of nearly equal length."""
    batches = -(-samples // batch_size)
    bounds = np.linspace(0, batches, min(shards, batches) + 1).round().astype(int)
    return [(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


class ShardedStatistics(CollectStatistics):
    """:class:`~spa_compiler.stages.CollectStatistics` with the samples spread over Ray workers."""

    def __init__(self, shards: int) -> None:
        self.shards = shards

    def collect(self, graph: Graph, layers: list[ConsumerLayer], data: dict[str, np.ndarray], config: PruneConfig,
                progress) -> dict[str, LayerStatistics]:
        ray = _ray()
        batch_size = config.calibration_batch  # rows are drawn per batch, however many samples a run takes
        samples = len(next(iter(data.values())))
        plan = statistics_shards(samples, batch_size, self.shards)
        task, graph_ref = ray.remote(collect_statistics), ray.put(graph)
        total = sum(count for _, count in plan)
        parts = ray.get([
            task.remote(graph_ref, layers, {k: v[first * batch_size:(first + count) * batch_size] for k, v in data.items()},
                        batch_size, config.seed, None, first, total)
            for first, count in plan
        ])
        progress(samples, samples)
        return add_statistics(parts)


class RayEngine:
    """The sweep's points as Ray tasks; statistics in shards, one per CPU of the cluster."""

    name = "ray"

    def __init__(self) -> None:
        start_ray()
        self.shards = max(1, int(_ray().cluster_resources().get("CPU", 1)))

    def prepare(self, source, base, points, progress):
        return prepare(source, base, points, progress, ShardedStatistics(self.shards))

    def run(self, states, points, base, directory, progress_for):
        """Tasks for every point at once; each outcome as it arrives (per-point progress lines stay
        in the workers)."""
        ray = _ray()
        base = replace(base, evaluation=str(Path(base.evaluation).resolve()) if base.evaluation else None)
        starts = {criterion: ray.put(state) for criterion, state in states.items()}
        task = ray.remote(attempt_point)
        pending = {
            task.remote(starts[point.criterion], point, base, Path(directory).resolve()): index
            for index, point in enumerate(points)
        }
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])
