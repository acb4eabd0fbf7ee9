"""Data-free inputs that are not images: token ids with a frequency prior read from the embedding
table, masks, token types, positions, audio.

**Token ids.** An integer input read by a Gather on a constant ``[vocabulary, width]`` table
(through casts and reshapes) gets ids drawn from a prior over the rows that uses nothing but
that table. Tokenizer vocabularies are laid out in blocks: special tokens and never-trained
placeholder rows first, then an alphabet (single characters or bytes, ordered by code point,
most of them rare), then the merged tokens or words, roughly in order of frequency. Two
properties of the row norms ``‖e_r‖`` (relative to their median ``m``) find the blocks:

- rows with ``‖e_r‖ < m / 2`` were (almost) never updated in training: they are never drawn;
- rows with ``‖e_r‖ >= 3m/4`` are *typical*; the rare characters of the alphabet and the
  placeholders are short, so the frequency-ordered block is where typical rows become dense:
  its start ``s`` is the first row from which typical rows fill at least 90% of a window of
  ``w = min(256, V/4)`` rows, refined inside ``[s - w, s + w)`` to the boundary ``b`` maximising
  the CUSUM ``Σ_{lo <= r < b} (0.9 - typical_r)`` (short rows before it, typical after), then
  moved to the first typical row at or after ``b``. The block counts only when it starts past
  the special tokens (the lowest ``min(1000, V/30)`` ids) and at most half of the rows between
  those and ``s`` are typical (an alphabet of mostly short rows precedes it).

Ids are then drawn with a Zipf law over the trained rows from ``s`` on, in order:
``p(k-th row) ∝ 1/(k + 2.7)``. Nothing is drawn before ``s``: the alphabet is in code-point
order, so the table does not say which of its characters are common (a share spread evenly
over its typical rows, or by a Zipf law in row order, measured no better). When no block stands
out (e.g. a table with no norm structure), the prior falls back to the Zipf law over the
trained rows past the special tokens in row order.

Why: on all-MiniLM-L6-v2 (BERT WordPiece, 30522 rows) the block starts at row 1996 ("the"),
exactly where the word list begins after the single characters; the Zipf law from row 1000
that preceded this rule put 58% of the ids on single characters (13% of the tokens of the
benchmark's sentences are). The default pipeline data-free keeps a sentence-embedding cosine of 0.897
instead of 0.864 at ``--flops 0.75`` and 0.767 instead of 0.709 at ``0.5``.

Other inputs: named like a mask, ones; like token types or segments, zeros; like positions,
``0, 1, ...`` along the last axis; float ids (a Keras Embedding casts its float input), token
ids as the integer ones; float ``[N, T]``, ``[N, 1 or 2, T]`` or ``[N, T, 1 or 2]`` with
``T >= 1000``, audio (notes: :mod:`.synthetic_audio`); features that scikit-learn's
``StandardScaler`` reads (an ``ai.onnx.ml`` ``Scaler``, ``y = (x - offset) * scale``), the
scaler's inverse of standard normal values, ``x = offset + z / scale``: the training features'
mean and deviation, which it records as a BatchNorm does (a digits MLP data-free at ``--flops
0.3`` reads 0.961 of its test images, 0.975 unpruned, where plain standard normal features
gave 0.942); other floats standard normal; other 8-bit inputs (bytes, pixels) uniform over 0 to
255; other integers zeros.

**Lengths.** Real batches are sentences of many lengths padded to one: attention spreads over
fewer tokens in a short one. When an integer or boolean ``[N, T]`` mask (one :mod:`.token_mask`
recognises, so that statistics leave its padding out) comes with token ids of the same shape,
:func:`varied_lengths` gives each sample a length drawn uniformly from ``⌈T/4⌉ .. T`` and
zeroes the mask after it (right padding, which a causal model's real tokens never see either).
On all-MiniLM-L6-v2 (benchmark sentences of 8 to 27 tokens at ``T = 32``) the default pipeline
data-free kept a sentence-embedding cosine of 0.931 instead of 0.927 at ``--flops 0.75`` and
0.841 instead of 0.835 at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ir import Graph, Node
from .synthetic_audio import audio_notes, waveform_layout
from .token_mask import attention_mask

__all__ = [
    "TokenPrior", "token_prior", "token_ids", "embedding_table", "non_image_input", "is_waveform", "varied_lengths", "BYTES",
]

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
TRAINED_NORM = 0.5  # rows shorter than this times the median norm are never drawn
TYPICAL_NORM = 0.75  # rows at least this times the median norm are typical
REGION_WINDOW = 256  # rows over which typical rows must be dense
REGION_DENSITY = 0.9  # share of typical rows that marks the frequency-ordered block
EARLY_DENSITY = 0.5  # at most this share of the rows before the block may be typical
ZIPF_OFFSET = 2.7
SHORTEST = 0.25  # shortest synthetic sequence, as a share of the bound length
BYTES = "8-bit values uniform over 0 to 255"
NORM_BLOCK_ELEMENTS = 1 << 18  # table elements whose norms are computed at once


@dataclass(frozen=True)
class TokenPrior:
    """Probabilities over the rows of an embedding table and a line saying how they were chosen."""

    probabilities: np.ndarray
    description: str


def embedding_table(graph: Graph, name: str) -> np.ndarray | None:
    """The constant 2-D table a Gather reads rows of with ``name``'s values, following casts and
    reshapes; None when there is none."""
    frontier, seen = [name], set()
    while frontier:
        tensor = frontier.pop()
        seen.add(tensor)
        for node in graph.consumers.get(tensor, []):
            data = _rows_read(node, tensor)
            if data and graph.is_constant(data) and graph.constants[data].ndim == 2:
                return graph.constants[data]
            if node.op_type in PASS_THROUGH and node.inputs[0] == tensor:
                frontier.extend(o for o in node.outputs if o not in seen)
    return None


def _rows_read(node: Node, tensor: str) -> str | None:
    """The table whose rows ``node`` reads with ``tensor``'s values: a Gather's data (on axis 0),
    an (onnxruntime) EmbedLayerNormalization's word embedding."""
    if node.op_type == "Gather" and node.inputs[1] == tensor and int(node.attr("axis", 0)) == 0:
        return node.inputs[0]
    if node.op_type == "EmbedLayerNormalization" and node.inputs[0] == tensor:
        return node.inputs[2]
    return None


def _frequency_ordered_start(typical: np.ndarray) -> int | None:
    """The first row of the block where ``typical`` rows are dense (see the module docstring),
    None when no window of rows is."""
    window = max(1, min(REGION_WINDOW, len(typical) // 4))
    fill = np.convolve(typical, np.ones(window) / window, mode="valid")  # fill[r]: rows r .. r + window - 1
    dense = np.flatnonzero(fill >= REGION_DENSITY)
    if len(dense) == 0:
        return None
    low = max(int(dense[0]) - window, 0)
    gain = np.cumsum(REGION_DENSITY - typical[low : int(dense[0]) + window])
    boundary = low + int(np.argmax(gain)) + 1 if gain.max() > 0 else low
    return boundary + int(np.argmax(typical[boundary:]))


def token_prior(table: np.ndarray) -> TokenPrior:
    """The prior over the rows of ``table`` (``[vocabulary, width]``) of the module docstring."""
    vocabulary = len(table)
    norms = row_norms(table)
    median = np.median(norms)
    trained, typical = norms >= TRAINED_NORM * median, norms >= TYPICAL_NORM * median
    specials = min(1000, vocabulary // 30)
    start = _frequency_ordered_start(typical.astype(np.float64))
    found = start is not None and start > specials and typical[specials:start].mean() <= EARLY_DENSITY
    first = start if found else specials
    rows = np.flatnonzero(trained[first:]) + first
    if len(rows) == 0:
        rows = np.arange(vocabulary)
    probabilities = np.zeros(vocabulary)
    weights = 1.0 / (np.arange(len(rows)) + ZIPF_OFFSET)
    probabilities[rows] = weights / weights.sum()
    where = f"from row {first} (where rows of typical norm become dense)" if found \
        else f"in [{rows[0]}, {vocabulary - 1}]"
    return TokenPrior(probabilities, f"Zipf token ids {where} of a {vocabulary}-row embedding")


def row_norms(table: np.ndarray) -> np.ndarray:
    """The rows' Euclidean norms, in float64, a block of rows at a time: a streamed model's
    table stays on disk (a 1B model's embedding is 2 GB in float64)."""
    rows = max(1, NORM_BLOCK_ELEMENTS // max(table.shape[1], 1))
    return np.concatenate([
        np.linalg.norm(np.asarray(table[start : start + rows], dtype=np.float64), axis=1)
        for start in range(0, len(table), rows)
    ])


def token_ids(table: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Ids of rows of the embedding ``table`` drawn from :func:`token_prior`, and its description."""
    prior = token_prior(table)
    return rng.choice(len(table), size=shape, p=prior.probabilities), prior.description


def is_waveform(graph: Graph, name: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether :func:`non_image_input` gives input ``name`` of ``shape`` (samples first) notes:
    floats of a waveform's shape, neither a mask nor ids an embedding table reads."""
    if not np.issubdtype(dtype, np.floating) or "mask" in name.lower() or waveform_layout(shape) is None:
        return False
    table = embedding_table(graph, name)
    return table is None or len(table) < 2


def non_image_input(
    graph: Graph, name: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Synthetic values for a graph input that is not an image, and a note saying what they are
    (see the module docstring)."""
    lowered = name.lower()
    if "mask" in lowered:
        return np.ones(shape, dtype), "ones (a mask)"
    floating = np.issubdtype(dtype, np.floating)
    if not floating and ("type" in lowered or "segment" in lowered):
        return np.zeros(shape, dtype), "zeros (token types)"
    if not floating and "position" in lowered:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype), "0, 1, ... (positions)"
    table = embedding_table(graph, name)  # float ids too: Keras's Embedding casts its float input
    if table is not None and len(table) >= 2:
        ids, note = token_ids(table, shape, rng)
        return ids.astype(dtype), note
    if floating:
        layout = waveform_layout(shape)
        if layout == "NTC":
            channels_first = audio_notes(rng, (shape[0], shape[2], shape[1]), dtype)
            return np.ascontiguousarray(np.swapaxes(channels_first, 1, 2)), "notes (audio)"
        if layout is not None:
            return audio_notes(rng, shape, dtype), "notes (audio)"
        scaler = _scaler(graph, name)
        if scaler is not None:
            offset, scale = scaler
            z = rng.standard_normal(shape)
            inverse = np.divide(z, scale, out=np.zeros_like(z), where=scale != 0)
            return (offset + inverse).astype(dtype), "standard normal through the inverse of its Scaler"
        return rng.standard_normal(shape).astype(dtype), "standard normal"
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8), BYTES
    return np.zeros(shape, dtype), "zeros"


def _scaler(graph: Graph, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(offset, scale)`` of the ``ai.onnx.ml`` Scaler reading ``name`` when it is its only
    reader, else None."""
    readers = graph.consumers.get(name, [])
    if len(readers) != 1 or readers[0].op_type != "Scaler" or readers[0].domain != "ai.onnx.ml":
        return None
    offset, scale = readers[0].attr("offset", [0.0]), readers[0].attr("scale", [1.0])
    return np.asarray(offset, dtype=np.float64), np.asarray(scale, dtype=np.float64)


def varied_lengths(graph: Graph, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, str]:
    """Right-pad the samples of ``arrays`` to lengths drawn from ``⌈T/4⌉ .. T`` by zeroing the
    ``[N, T]`` mask input after each length, when token ids of the same shape come with it (see
    the module docstring); ``{mask name: what it now holds}``, empty when no mask qualifies."""
    tokens = {value.shape for name, value in arrays.items()
              if value.ndim == 2 and embedding_table(graph, name) is not None}
    for name, mask in arrays.items():  # an integer or boolean mask: padding is then left out of statistics
        if attention_mask({name: mask}) is not None and mask.shape in tokens and mask.shape[1] > 1:
            samples, length = mask.shape
            shortest = int(np.ceil(SHORTEST * length))
            lengths = rng.integers(shortest, length + 1, samples)
            arrays[name] = np.where(np.arange(length) < lengths[:, None], mask, 0).astype(mask.dtype)
            return {name: f"ones for the first {shortest} to {length} tokens, then zeros (a mask; right padding)"}
    return {}
