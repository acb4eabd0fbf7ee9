"""The original model and a pruned one run side by side: the paired statistics a re-fit needs.

For a consumer layer, ``x`` are its input features in the original network and ``x̃`` those
the pruned network gives it at the same positions (both with a trailing constant 1): the
re-fit toward the original outputs needs ``G̃ = Σ x̃ x̃ᵀ`` and ``C = Σ x̃ xᵀ``
(:mod:`spa_compiler.refit`). For a layer that feeds a residual stream, ``x`` is extended by the
stream's error ``δ = r − r̃`` at the same rows (:mod:`spa_compiler.residual_target`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx

from .calibrate import (
    MAX_ROWS,
    ROWS_PER_FEATURE,
    ConsumerLayer,
    exposing,
    with_weight_inputs,
)
from .batch_axis import exact_batch
from .feature_rows import feature_width, layer_features, row_products, sample_rows
from .residual_target import residual_rows
from .sample_layout import run_samples
from .ir import Graph
from .subnetwork import prefix_model
from .token_mask import attention_mask
from .verify import session_for

__all__ = ["PairedStatistics", "PairedRunner", "one_ahead"]

T = TypeVar("T")
R = TypeVar("R")


def one_ahead(run: Callable[[T], R], items: list[T]) -> Iterator[tuple[T, R]]:
    """``(item, run(item))`` in order, each item's run started in a second thread before the
    caller handles the result before it: onnxruntime's next run of a re-fit stage then overlaps
    the sums the caller adds from the last one (both release the GIL), where one core would
    idle while the other works. At most two results are held at once."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[T, Future[R]] | None = None
        for item in items:
            future = pool.submit(run, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


@dataclass
class PairedStatistics:
    """What re-fitting a layer on a pruned network's inputs toward the original outputs needs:
    ``gram = Σ x̃ x̃ᵀ`` over the pruned input's features and ``cross = Σ x̃ xᵀ`` against the
    original input's features at the same positions, both with a trailing constant 1. They are
    kept in two folds (``gram[f]``, ``cross[f]``: the rows of alternate batches of samples), so
    a re-fit can be checked on rows it was not fitted to. ``residual`` is the width of the
    residual stream's error ``δ`` that extends ``x`` (0 for none): ``cross`` against ``[x; δ; 1]``."""

    layer: ConsumerLayer
    gram: np.ndarray  # [2, pruned features + 1, pruned features + 1]
    cross: np.ndarray  # [2, pruned features + 1, features + residual + 1]
    residual: int = 0

    @classmethod
    def empty(cls, layer: ConsumerLayer, pruned_width: int, width: int, residual: int = 0) -> "PairedStatistics":
        """Zero sums for ``pruned_width`` and ``width`` (+ ``residual``) features (without the constant 1)."""
        return cls(layer, np.zeros((2, pruned_width + 1, pruned_width + 1)),
                   np.zeros((2, pruned_width + 1, width + residual + 1)), residual)

    def add(self, pruned: np.ndarray, original: np.ndarray, fold: int = 0) -> None:
        """Fold in one batch of rows (:func:`~spa_compiler.feature_rows.row_products`)."""
        gram, cross = row_products(pruned, original)
        self.gram[fold] += gram
        self.cross[fold] += cross


@dataclass
class _OriginalRows:
    """The rows a layer's statistics take from one batch (samples ``start`` to ``stop``):
    positions (None for all) and the original network's features there, and its residual
    stream's values there (None when the layer feeds none)."""

    start: int
    stop: int
    shape: tuple[int, ...]  # of the original activation on that batch
    taken: np.ndarray | None
    features: np.ndarray
    stream: np.ndarray | None = None


class PairedRunner:
    """The original model and a pruned one (same tensor names, fewer channels) run on the same
    inputs. The original runs once on every batch the stages use (:meth:`cache_original`): every
    layer's rows are drawn then and its features there kept. The pruned model's ``weights`` are graph inputs,
    so each run may give them new values, and each run computes only the start of the network
    that the layers asked for read (:func:`~spa_compiler.subnetwork.prefix_model`). The rows
    of a layer come in two folds, those of alternate batches; a stage of ``n`` samples runs in
    batches of ``batch_size`` but at least two (one sample each when the model's batch is fixed).
    ``streams`` maps a layer (by node) to the residual stream its output is added to, whose
    error extends its original features."""

    def __init__(self, graph: Graph, pruned: onnx.ModelProto, layers: list[ConsumerLayer], weights: set[str],
                 batch_size: int = 16, streams: dict[str, str] | None = None) -> None:
        self.graph = graph
        self.streams = streams or {}
        self.pruned = with_weight_inputs(pruned, weights)
        self.exact = exact_batch(graph)  # see batch_for
        self.batch_size = batch_size
        self.layers = layers
        self.original: dict[str, list[_OriginalRows]] = {}

    def batch_for(self, samples: int) -> int:
        """Samples per run for a stage of ``samples``: two batches at least, for two folds. A model
        that declares a batch of 1 runs one sample at a time even where it could run more
        (:mod:`~spa_compiler.batch_axis`): its folds and row draws stay those of single samples,
        and its runs hold one sample's activations (ResNet-50's take 100 MB per image, 1.6 GB in
        a run of 16). A model whose runs must hold its declared batch runs that many."""
        return self.exact or min(self.batch_size, max(1, -(-samples // 2)))

    def batches(self, samples: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` sample ranges a stage of ``samples`` runs in."""
        size = self.batch_for(samples)
        return [(start, min(start + size, samples)) for start in range(0, samples, size)]

    def cache_original(self, plan: list[tuple[list[ConsumerLayer], int]], data: dict[str, np.ndarray], seed: int = 0,
                       rows_per_feature: int = ROWS_PER_FEATURE) -> None:
        """Runs of the original network on the batches ``plan`` needs (layers, each with the
        number of leading samples its statistics use), each batch once, whichever stages share
        it (stages of different sizes differ in their batch size or their last batch): each
        layer's rows, at most ``rows_per_feature`` per feature in all, spread evenly over its
        batches (seeded)."""
        graph = self.graph
        available = len(next(iter(data.values())))
        planned = {layer.node: min(count, available) for layer_list, count in plan for layer in layer_list}
        layers = [layer for layer in self.layers if layer.node in planned]
        session = session_for(exposing(graph.model, self._read(layers)))
        rng = np.random.default_rng(seed)
        self.original = {layer.node: [] for layer in layers}
        readers: dict[tuple[int, int], list[ConsumerLayer]] = {}
        for layer in layers:
            for span in self.batches(planned[layer.node]):
                readers.setdefault(span, []).append(layer)
        for (start, stop), batch_layers in sorted(readers.items(), key=lambda item: (item[0][1] - item[0][0], item[0])):
            feeds = {name: array[start:stop] for name, array in data.items()}
            activations = self._read(batch_layers)
            values = dict(zip(activations, run_samples(session, activations, graph, feeds, self.exact)))
            mask = attention_mask(feeds)
            for layer in batch_layers:
                x = values[layer.activation]
                width = feature_width(layer, x.shape)
                budget = -(-min(rows_per_feature * (width + 1), MAX_ROWS) // len(self.batches(planned[layer.node])))
                taken = sample_rows(layer, graph, x.shape, rng, budget, mask)
                features = layer_features(layer, graph, x, taken)
                stream = self.streams.get(layer.node)
                rows = residual_rows(values[stream], taken, x.shape[:-1]) if stream else None
                self.original[layer.node].append(_OriginalRows(start, stop, x.shape, taken, features, rows))

    def _read(self, layers: list[ConsumerLayer]) -> list[str]:
        """The tensors a run must return for ``layers``: their inputs and residual streams."""
        streams = {self.streams[layer.node] for layer in layers if layer.node in self.streams}
        return sorted({layer.activation for layer in layers} | streams)

    def statistics(self, layers: list[ConsumerLayer], data: dict[str, np.ndarray],
                   weights: dict[str, np.ndarray]) -> dict[str, PairedStatistics]:
        """Every layer's :class:`PairedStatistics` over ``data`` (the samples its plan gave it),
        the pruned model (with ``weights``) read at the rows :meth:`cache_original` drew. A layer
        whose rows the pruning changed (its input lost elements on an axis other than the
        features') has none."""
        graph = self.graph
        layers = [layer for layer in layers if self.original.get(layer.node)]
        activations = self._read(layers)
        if not activations:
            return {}
        prefix = prefix_model(self.pruned, activations)
        read = {value.name for value in prefix.graph.input}
        weights = {name: value for name, value in weights.items() if name in read}  # those of the prefix
        session = session_for(prefix)
        spans = {layer.node: {(rows.start, rows.stop): rows for rows in self.original[layer.node]} for layer in layers}
        stats: dict[str, PairedStatistics] = {}
        def run(span: tuple[int, int]) -> list[np.ndarray]:
            part = {name: array[span[0]:span[1]] for name, array in data.items()}
            return run_samples(session, activations, graph, part, self.exact, weights)

        for index, ((start, stop), values) in enumerate(one_ahead(run, self.batches(len(next(iter(data.values())))))):
            narrowed = dict(zip(activations, values))
            for layer in layers:
                cached = spans[layer.node].get((start, stop))
                if cached is None:
                    continue
                x_pruned = narrowed[layer.activation]
                axis = layer.channel_axis
                if np.delete(cached.shape, axis).tolist() != np.delete(x_pruned.shape, axis).tolist():
                    continue  # pruning removed rows too (a channel axis among its row axes): no row pairs with one
                original = cached.features
                if cached.stream is not None:
                    stream = narrowed[self.streams[layer.node]]
                    if stream.shape[-1] == cached.stream.shape[-1]:
                        error = cached.stream - residual_rows(stream, cached.taken, x_pruned.shape[:-1])
                    else:  # a stream that lost channels: the plain target
                        error = np.zeros_like(cached.stream)
                    original = np.hstack([original, error])
                if layer.node not in stats:
                    width = feature_width(layer, x_pruned.shape)
                    residual = 0 if cached.stream is None else cached.stream.shape[1]
                    stats[layer.node] = PairedStatistics.empty(layer, width, cached.features.shape[1], residual)
                stats[layer.node].add(layer_features(layer, graph, x_pruned, cached.taken), original, index % 2)
        return stats
