"""More calibration rows for a token model given few sequences: more of the file's sequences, then
copies with some tokens replaced.

A sentence is a few dozen tokens, so 112 calibration sentences give a layer on tokens 1,717
rows, not much more than a 1,536-wide FFN layer has input features: its Hessian ``H = Σ x xᵀ``
is (nearly) singular, and the second-order scores, the compensation and the re-fit fit those few
sentences rather than the language. When the calibration's real tokens (by the attention mask)
are fewer than ``ROWS_PER_FEATURE · (f + 1)`` for the widest layer on tokens (``f`` input
features), copies of the calibration samples are appended, the ``k``-th copy of sample
``k mod n`` (``n`` samples), until the tokens suffice or every sample has ``MAX_COPIES`` copies.
Only when every input is ``[samples, tokens]`` like the ids (a KV cache or pixels would be
copied whole) and the samples have ``REPLACED_LEAST`` inner tokens each on average (shorter ones
would be copied unchanged).
In each copy ``REPLACED`` of the inner tokens (the real tokens but the first and the last, where
tokenizers put their special tokens) of the input that reads the largest embedding table (the
vocabulary) are replaced by ids drawn from the vocabulary's prior
(:func:`~spa_compiler.synthetic_tokens.token_prior`); every other input of a copy (mask,
token types, positions) is its source's. A copy keeps its sentence's context and varies the
words: its rows lie near the language, not only on the sentences given.

The copies come after the samples, so passes that use the first samples (sensitivity) see the
user's; the held-out samples that fidelity is measured on are set aside before.

Real sequences serve better than copies. So when the user did not say how many samples to use
and the file holds more than the default, a token model reads up to ``MORE_SEQUENCES`` times the
default number and keeps the first ones (at least the default) whose real tokens reach what the
widest layer wants (:func:`first_sequences`); copies top up only what those still lack. From a
file of 512 sentences MiniLM reads the first 404 (with 32 held out): cosine 0.962 at
``--flops 0.5`` in 30 s, where 128 of them and their copies give 0.947 in 50 s.

Measured on all-MiniLM-L6-v2, 128 calibration sentences (112 after the held-out ones, 290
copies), cosine of sentence embeddings: 0.935 → 0.947 at ``--flops 0.5`` (on the 65 written
sentences among the test ones, whose phrasing no calibration template shares, 0.869 → 0.899),
0.969 → 0.980 at 0.75 (written 0.950 → 0.957). How many tokens a copy replaces matters most on
the written sentences, at 0.5 over three seeds: 15% 0.891, 25% 0.894, 30% 0.896, **40%** 0.899,
50% 0.897, 70% 0.895, while the cosine over all test sentences stays at 0.947 up to 40% (0.943
at 50%). Twice the copies 0.948 (at 15%); appending 128 synthetic token sequences instead (no
sentence context) 0.941; 512 real sentences 0.963 (written 0.889: most of them share the test
sentences' templates), and copies added to those changed nothing (0.963).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibrate import ConsumerLayer
from .ir import Graph
from .refit import ROWS_PER_FEATURE
from .synthetic_tokens import embedding_table, token_prior
from .token_mask import attention_mask

__all__ = ["TokenCopies", "with_token_copies", "with_copies_to", "first_sequences", "tokens_wanted", "REPLACED",
           "MAX_COPIES", "MORE_SEQUENCES"]

REPLACED = 0.4  # share of a copy's inner tokens replaced
MAX_COPIES = 8  # copies per calibration sample at most
REPLACED_LEAST = 2  # inner tokens per sample, on average, below which no copies are made
MORE_SEQUENCES = MAX_COPIES + 1  # times the default samples a token model may read from a larger file


def tokens_wanted(graph: Graph, layers: list[ConsumerLayer]) -> int:
    """Rows the widest layer on tokens (activation ``[samples, tokens, features]``) needs:
    ``ROWS_PER_FEATURE`` per input feature and the bias; 0 when no layer reads tokens."""
    widths = [
        layer.features(graph) for layer in layers
        if len(graph.shapes[layer.activation]) == 3 and layer.channel_axis in (-1, 2)
    ]
    return ROWS_PER_FEATURE * (max(widths) + 1) if widths else 0


@dataclass(frozen=True)
class TokenCopies:
    """The calibration data with its copies, how many copies, the samples' real tokens and the
    tokens wanted."""

    data: dict[str, np.ndarray]
    copies: int = 0
    tokens: int = 0
    wanted: int = 0

    @property
    def note(self) -> str:
        """What the report adds to the calibration's description ("" without copies)."""
        if not self.copies:
            return ""
        return (f", and {self.copies} copies of them with {REPLACED:.0%} of their tokens replaced (their "
                f"{self.tokens} real tokens are fewer than the {self.wanted} the widest layer wants: more "
                "sequences would serve it better)")


def with_token_copies(graph: Graph, data: dict[str, np.ndarray], wanted: int, seed: int) -> TokenCopies:
    """``data`` followed by copies with replaced tokens (see the module docstring); ``data``
    itself when no input reads an embedding table or its tokens suffice."""
    vocabulary = _vocabulary_input(graph, data)
    if vocabulary is None or wanted <= 0:
        return TokenCopies(data)
    name, table = vocabulary
    ids = np.asarray(data[name])
    if ids.ndim != 2 or len(table) < 2 or any(np.shape(array) != ids.shape for array in data.values()):
        return TokenCopies(data)  # other inputs (a KV cache, pixels) would be copied whole: not only tokens
    samples = len(ids)
    real = _real_tokens(data, ids)
    tokens = int(real.sum())
    if tokens >= wanted or _inner_tokens(real).sum() < REPLACED_LEAST * samples:
        return TokenCopies(data)  # enough tokens, or (nearly) none to replace: copies would be duplicates
    per_sample = tokens / samples
    copies = min(MAX_COPIES * samples, int(np.ceil((wanted - tokens) / per_sample)))
    sources = np.arange(copies) % samples
    rng = np.random.default_rng(seed)
    inner = _inner_tokens(real[sources])
    replaced = inner & (rng.random(inner.shape) < REPLACED)
    copied = {key: np.asarray(array)[sources] for key, array in data.items()}
    draws = rng.choice(len(table), size=int(replaced.sum()), p=token_prior(table).probabilities)
    copied[name] = copied[name].copy()
    copied[name][replaced] = draws.astype(ids.dtype)
    return TokenCopies({key: np.concatenate([np.asarray(data[key]), copied[key]]) for key in data}, copies, tokens, wanted)


def with_copies_to(graph: Graph, data: dict[str, np.ndarray], samples: int, seed: int) -> TokenCopies:
    """``data`` followed by copies with replaced tokens until it holds ``samples`` sequences (at
    most ``MAX_COPIES`` per sequence; see the module docstring); ``data`` itself when no input
    reads an embedding table or it holds that many already."""
    vocabulary = _vocabulary_input(graph, data)
    count = len(next(iter(data.values()))) if data else 0
    if vocabulary is None or np.ndim(data[vocabulary[0]]) != 2 or count >= samples:
        return TokenCopies(data)
    tokens = int(_real_tokens(data, np.asarray(data[vocabulary[0]])).sum())
    return with_token_copies(graph, data, tokens * samples // count, seed)


def first_sequences(graph: Graph, data: dict[str, np.ndarray], wanted: int, least: int) -> dict[str, np.ndarray]:
    """The first samples of ``data``: ``least``, or more while their real tokens (by the attention
    mask) are fewer than ``wanted``; the first ``least`` when no input reads an embedding table."""
    vocabulary = _vocabulary_input(graph, data)
    ids = np.asarray(data[vocabulary[0]]) if vocabulary else None
    count = least
    if ids is not None and ids.ndim == 2:
        running = np.cumsum(_real_tokens(data, ids).sum(axis=1))
        count = max(least, int(np.searchsorted(running, wanted)) + 1)
    return {key: np.asarray(array)[:count] for key, array in data.items()}


def _vocabulary_input(graph: Graph, data: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """The input that reads the largest embedding table (the vocabulary's, not token types' or
    positions') and that table; None when no input reads one."""
    tables = {name: table for name in data if (table := embedding_table(graph, name)) is not None}
    if not tables:
        return None
    name = max(tables, key=lambda n: len(tables[n]))
    return name, tables[name]


def _real_tokens(data: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Booleans over ``ids``: the attention mask's real positions, or every position without one."""
    mask = attention_mask(data)
    return mask if mask is not None and mask.shape == ids.shape else np.ones(ids.shape, dtype=bool)


def _inner_tokens(real: np.ndarray) -> np.ndarray:
    """Per row, the real positions but the first and the last real one."""
    positions = np.arange(real.shape[1])
    first = np.where(real.any(axis=1), real.argmax(axis=1), 0)
    last = real.shape[1] - 1 - real[:, ::-1].argmax(axis=1)
    return real & (positions > first[:, None]) & (positions < last[:, None])
