"""The original model and a pruned one run side by side: the paired statistics a re-fit needs.

For a consumer layer, ``x`` are its input features in the original network and ``x̃`` those
the pruned network gives it at the same positions (both with a trailing constant 1): the
re-fit toward the original outputs needs ``G̃ = Σ x̃ x̃ᵀ`` and ``C = Σ x̃ xᵀ``
(:mod:`spa_compiler.refit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import (
    MAX_ROWS,
    ROWS_PER_FEATURE,
    ConsumerLayer,
    batches,
    exposing,
    fixed_batch,
    with_weight_inputs,
)
from .feature_rows import feature_width, layer_features, sample_rows
from .ir import Graph
from .token_mask import attention_mask
from .verify import session_for

__all__ = ["PairedStatistics", "PairedRunner"]


@dataclass
class PairedStatistics:
    """What re-fitting a layer on a pruned network's inputs toward the original outputs needs:
    ``gram = Σ x̃ x̃ᵀ`` over the pruned input's features and ``cross = Σ x̃ xᵀ`` against the
    original input's features at the same positions, both with a trailing constant 1. They are
    kept in two folds (``gram[f]``, ``cross[f]``: the rows of alternate batches of samples), so
    a re-fit can be checked on rows it was not fitted to."""

    layer: ConsumerLayer
    gram: np.ndarray  # [2, pruned features + 1, pruned features + 1]
    cross: np.ndarray  # [2, pruned features + 1, features + 1]

    @classmethod
    def empty(cls, layer: ConsumerLayer, pruned_width: int, width: int) -> "PairedStatistics":
        """Zero sums for ``pruned_width`` and ``width`` features (without the constant 1)."""
        return cls(layer, np.zeros((2, pruned_width + 1, pruned_width + 1)), np.zeros((2, pruned_width + 1, width + 1)))

    def add(self, pruned: np.ndarray, original: np.ndarray, fold: int = 0) -> None:
        """Fold in one batch of rows: products in float32 (twice as fast; one batch's sums are
        well within its precision), accumulated in float64."""
        ones = np.ones((len(pruned), 1), dtype=np.float32)
        pruned = np.hstack([pruned.astype(np.float32), ones])
        self.gram[fold] += pruned.T @ pruned
        self.cross[fold] += pruned.T @ np.hstack([original.astype(np.float32), ones])


class PairedRunner:
    """The original model and a pruned one (same tensor names, fewer channels) run side by side
    on the same inputs. The pruned model's ``weights`` are graph inputs, so each run may give
    them new values; onnxruntime computes only what the requested activations need."""

    def __init__(self, graph: Graph, pruned: onnx.ModelProto, layers: list[ConsumerLayer], weights: set[str]) -> None:
        self.graph = graph
        activations = sorted({layer.activation for layer in layers})
        self.original = session_for(exposing(graph.model, activations))
        self.pruned = session_for(with_weight_inputs(exposing(pruned, activations), weights))
        self.batch_size = 1 if fixed_batch(graph) else None

    def statistics(
        self,
        layers: list[ConsumerLayer],
        data: dict[str, np.ndarray],
        weights: dict[str, np.ndarray],
        batch_size: int = 16,
        seed: int = 0,
        rows_per_feature: int = ROWS_PER_FEATURE,
    ) -> dict[str, PairedStatistics]:
        """Every layer's :class:`PairedStatistics`, the rows of both models taken at the same
        positions (at most ``rows_per_feature`` per feature in all); the pruned model runs with
        ``weights``. A layer whose rows the pruning changed (its input lost elements on an axis
        other than the features') has none."""
        graph = self.graph
        activations = sorted({layer.activation for layer in layers})
        total = len(next(iter(data.values())))
        batch_size = self.batch_size or min(batch_size, max(1, -(-total // 2)))  # two batches at least: two folds
        stats: dict[str, PairedStatistics] = {}
        rng = np.random.default_rng(seed)
        batch_count = -(-total // batch_size)
        for index, feeds in enumerate(batches(data, batch_size)):
            original = dict(zip(activations, self.original.run(activations, feeds)))
            narrowed = dict(zip(activations, self.pruned.run(activations, {**feeds, **weights})))
            mask = attention_mask(feeds)
            for layer in layers:
                x, x_pruned = original[layer.activation], narrowed[layer.activation]
                if np.delete(x.shape, layer.channel_axis).tolist() != np.delete(x_pruned.shape, layer.channel_axis).tolist():
                    continue  # pruning removed rows too (a channel axis among its row axes): no row pairs with one
                width = feature_width(layer, x.shape)
                budget = -(-min(rows_per_feature * (width + 1), MAX_ROWS) // batch_count)
                taken = sample_rows(layer, graph, x, rng, budget, mask)
                if layer.node not in stats:
                    stats[layer.node] = PairedStatistics.empty(layer, feature_width(layer, x_pruned.shape), width)
                stats[layer.node].add(
                    layer_features(layer, graph, x_pruned, taken), layer_features(layer, graph, x, taken), index % 2
                )
        return stats
