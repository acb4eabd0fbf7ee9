"""The rows a consumer layer's statistics are made of: im2col patches of a convolution's input,
or the positions of a linear layer's input (pixels, tokens), each a vector of the layer's input
features. Rows are a seeded random subset when there are more than a statistic needs, and only
rows at real tokens where an attention mask marks padding (:mod:`~spa_compiler.token_mask`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .ir import Graph, Node
from .token_mask import real_rows

if TYPE_CHECKING:
    from .calibrate import ConsumerLayer

__all__ = ["conv_patches", "sample_rows", "row_count", "layer_features", "feature_width", "row_products"]


def conv_patches(x: np.ndarray, node: Node, kernel: tuple[int, ...], rows: np.ndarray | None) -> np.ndarray:
    """im2col rows ``[positions, C * prod(kernel)]`` (channel-major) of a 2-D Conv's input;
    ``rows`` picks flat output positions (all when None)."""
    strides = node.attr("strides") or [1, 1]
    dilations = node.attr("dilations") or [1, 1]
    pads = node.attr("pads") or [0, 0, 0, 0]
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        pads = _same_pads(x.shape[2:], kernel, strides, dilations, node.attr("auto_pad"))
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))) if any(pads) else x
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, oh, ow = windows.shape[:4]
    if rows is None:
        flat = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c, *kernel)
    else:
        sample, position = np.divmod(np.asarray(rows), oh * ow)
        flat = windows[sample, :, position // ow, position % ow]  # [rows, c, kh, kw], gathered directly
    return flat.reshape(flat.shape[0], -1)


def _same_pads(size, kernel, strides, dilations, mode) -> list[int]:
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begin.append(large if mode == "SAME_LOWER" else small)
        end.append(small if mode == "SAME_LOWER" else large)
    return begin + end


def sample_rows(layer: ConsumerLayer, graph: Graph, shape: tuple[int, ...], rng: np.random.Generator, max_rows: int,
                mask: np.ndarray | None = None) -> np.ndarray | None:
    """At most ``max_rows`` of the layer's feature rows (patch positions or tokens) of a batch of
    input ``shape``, a seeded random sorted subset, only rows at real tokens of the attention
    ``mask`` (:mod:`~spa_compiler.token_mask`); None for all."""
    total = row_count(layer, graph, shape)
    real = None if layer.patches else real_rows(shape, layer.channel_axis, mask)
    if real is not None:
        rows = np.flatnonzero(real)
        return rows if len(rows) <= max_rows else np.sort(rng.choice(rows, max_rows, replace=False))
    return None if total <= max_rows else np.sort(rng.choice(total, max_rows, replace=False))


def row_count(layer: ConsumerLayer, graph: Graph, shape: tuple[int, ...]) -> int:
    """The layer's feature rows in a batch of input ``shape``: output positions of a convolution
    with patch statistics, else positions of the input (pixels, tokens). Rows are sample-major."""
    if layer.patches:
        out = graph.shapes[graph.node_by_name[layer.node].outputs[0]]
        return shape[0] * out[2] * out[3]
    return int(np.prod(shape)) // shape[layer.channel_axis]


def layer_features(layer: ConsumerLayer, graph: Graph, x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The layer's feature rows of its input batch ``x`` (im2col patches, pixels or tokens);
    ``x`` may have fewer channels than the original (a pruned model's activation)."""
    if layer.patches:
        node = graph.node_by_name[layer.node]
        return conv_patches(x, node, graph.shapes[layer.weight][2:], rows)
    flat = np.moveaxis(x, layer.channel_axis, -1).reshape(-1, x.shape[layer.channel_axis])
    return flat if rows is None else flat[rows]


def feature_width(layer: ConsumerLayer, shape: tuple[int, ...]) -> int:
    return shape[layer.channel_axis] * layer.features_per_channel


def row_products(rows: np.ndarray, other: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``[rows 1]ᵀ[rows 1]`` and, given ``other`` (same row count), ``[rows 1]ᵀ[other 1]``: the
    sums one chunk of rows adds to second-order statistics. The products are in float32 (twice
    as fast; one chunk's sums, a few thousand rows, are well within its precision; callers
    accumulate them in float64), in float64 when float32 overflows (activations beyond 1e19)."""
    for dtype in (np.float32, np.float64):
        ones = np.ones((len(rows), 1), dtype=dtype)
        left = np.hstack([rows.astype(dtype), ones])
        with np.errstate(over="ignore"):
            gram = left.T @ left
            cross = None if other is None else left.T @ np.hstack([other.astype(dtype), ones])
        if np.isfinite(gram).all() and (cross is None or np.isfinite(cross).all()):
            break
    return gram, cross
