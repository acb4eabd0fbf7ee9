"""Padding positions: rows of a token model's activations that no real token produced.

A sentence encoder fed a batch of sentences padded to one length reads an attention mask
(``[samples, tokens]``, 1 for a real token, 0 for padding). Attention never reads a padded
position, so what a layer computes there reaches no real token; and in short sentences padded to
32 tokens most rows are padding. Statistics, distortions and fidelity counted over those rows
fit and measure what no output that matters depends on. So wherever an activation or output
leads with the mask's shape, only its rows at real tokens count.

The mask is the graph input named like a mask (as data-free calibration also recognises it)
of integer or boolean type and rank 2; a model without one, or an activation of another shape
(a convolution's, a pooled one), keeps every row.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_mask", "real_rows", "padding_zeroed"]


def attention_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """The ``[samples, tokens]`` attention mask among the inputs ``feeds`` as booleans, or None."""
    for name, value in feeds.items():
        value = np.asarray(value)
        if "mask" in name.lower() and value.ndim == 2 and (value.dtype == bool or np.issubdtype(value.dtype, np.integer)):
            return value != 0
    return None


def real_rows(shape: tuple[int, ...], channel_axis: int, mask: np.ndarray | None) -> np.ndarray | None:
    """For a token activation of ``shape`` (``[samples, tokens, features]``, features last), the
    flat booleans over its rows that mark real tokens; None when every row counts (no mask, every
    token real, or the activation not laid out by the mask)."""
    if mask is None or channel_axis not in (-1, len(shape) - 1) or tuple(shape[:-1]) != mask.shape or mask.all():
        return None
    return mask.reshape(-1)


def padding_zeroed(y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The output ``y`` with its values at padding positions set to zero when ``y`` leads with
    the mask's shape (so sums and per-sample comparisons count real tokens only), else ``y``."""
    if mask is None or np.ndim(y) < 2 or np.shape(y)[:2] != mask.shape or mask.all():
        return y
    return np.where(mask.reshape(mask.shape + (1,) * (np.ndim(y) - 2)), y, 0)
