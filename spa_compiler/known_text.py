"""Data-free text for a token model whose vocabulary spa-prune recognises: English sentences that
ship with it.

Token ids drawn from the vocabulary's prior (:mod:`.synthetic_tokens`) have its frequencies but
none of its grammar, and a transformer's layers see other activations on them than on text.
Where the ids mean something spa-prune knows, it does better: ``text/english.txt`` holds 640
sentences of its own on everyday subjects (news, science, cooking, sport, travel, work, health,
questions, instructions, dialogue; 4 to 35 words), and ``text/<vocabulary>.npz`` their ids under
a vocabulary (``ids``: every sentence's tokens one after another, framed as its tokenizer frames
a sequence; ``lengths``: tokens per sentence), written by ``python -m models.tokenise_text``.

**Recognising a vocabulary** from the model alone, without its tokenizer: the embedding table
``E`` (``[V, width]``) must have the vocabulary's row count, and words of one kind must sit
together in it. For each kind (number words, month names, weekday names, colour names; ids
scattered over the vocabulary), with rows centred on the mean row of the word block and
normalised, the mean cosine ``c_kind`` of the kind's pairs is compared with the cosines between
``BASELINE_ROWS`` random word rows (mean ``μ``, deviation ``σ``); the vocabulary is recognised
when every kind has ``(c_kind − μ) / σ >= COHESION``. all-MiniLM-L6-v2's table gives 5.2 (colours)
to 8.5 (weekdays); a random table, its rows shuffled, or shifted by one row (another vocabulary
of the same size) give at most 1.0.

**Sequences.** One sentence per sample, its ids truncated to the input's length ``T`` (the
vocabulary's separator kept last) and right-padded with the padding id; an attention mask (one
:mod:`.token_mask` recognises) is 1 over the sentence and 0 after it; every other input keeps the
synthetic values it was given (token types zeros, positions ``0, 1, ...``). As many sentences as
samples are asked for, at most all 640.

On all-MiniLM-L6-v2 (sentences of the accuracy benchmark, none of them here) the default
pipeline data-free keeps a sentence-embedding cosine of 0.930 instead of 0.843 at
``--flops 0.5`` (see the README's accuracy table).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from .ir import Graph
from .token_mask import attention_mask
from .synthetic_tokens import embedding_table

__all__ = ["Vocabulary", "VOCABULARIES", "KnownText", "recognised_vocabulary", "cohesion", "known_text",
           "sentence_ids", "shipped_shape", "TEXT_FOLDER", "SHIPPED"]

TEXT_FOLDER = Path(__file__).resolve().parent / "text"
SHIPPED = "English sentences that ship with spa-prune"  # how the report and distillation name them
COHESION = 3.0  # standard deviations of random pairs' cosine each kind of word must clear
BASELINE_ROWS = 2000  # random word rows whose cosines between each other give the baseline


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer vocabulary spa-prune has text for: ``rows`` ids, words from ``words_from`` on,
    ``kinds`` groups of ids of words of one kind, ``separator`` ending and ``padding`` filling a
    sequence, its ids in ``TEXT_FOLDER / file``."""

    name: str
    rows: int
    words_from: int
    separator: int
    padding: int
    kinds: dict[str, tuple[int, ...]]
    file: str


BERT_UNCASED = Vocabulary(
    name="BERT uncased WordPiece",
    rows=30522,
    words_from=1996,  # "the": single characters and placeholders come before
    separator=102,  # [SEP]
    padding=0,  # [PAD]
    kinds={
        "number words": (2028, 2048, 2093, 2176, 2274, 2416, 2698, 2809, 3157, 2702),  # one .. ten
        "months": (2254, 2337, 2233, 2258, 2089, 2238, 2251, 2257, 2244, 2255, 2281, 2285),  # january .. december
        "weekdays": (6928, 9857, 9317, 9432, 5958, 5095, 4465),  # monday .. sunday
        "colours": (2417, 2665, 2630, 3756, 2304, 2317, 2829, 4589, 6379, 5061),  # red, green, blue, ...
    },
    file="bert_uncased.npz",
)
VOCABULARIES = (BERT_UNCASED,)


@dataclass(frozen=True)
class KnownText:
    """Samples whose token ids are sentences of ``english.txt``, and a line for the report."""

    data: dict[str, np.ndarray]
    note: str


def cohesion(table: np.ndarray, vocabulary: Vocabulary) -> dict[str, float]:
    """``(c_kind − μ) / σ`` for each kind of ``vocabulary`` on ``table`` (the module docstring)."""
    words = table[vocabulary.words_from :]
    centre = np.mean(words, axis=0, dtype=np.float64)

    def unit(rows: np.ndarray) -> np.ndarray:
        centred = np.asarray(rows, dtype=np.float64) - centre
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)

    rows = np.random.default_rng(0).choice(len(words), size=min(BASELINE_ROWS, len(words)), replace=False)
    sample = unit(words[np.sort(rows)])
    baseline = (sample @ sample.T)[np.triu_indices(len(sample), 1)]
    scores = {}
    for kind, ids in vocabulary.kinds.items():
        rows = unit(table[list(ids)])
        scores[kind] = float(((rows @ rows.T)[np.triu_indices(len(ids), 1)].mean() - baseline.mean()) / baseline.std())
    return scores


def recognised_vocabulary(table: np.ndarray) -> Vocabulary | None:
    """The vocabulary of ``VOCABULARIES`` whose row count ``table`` has and whose kinds of words
    cluster in it, or None."""
    for vocabulary in VOCABULARIES:
        if len(table) == vocabulary.rows and min(cohesion(table, vocabulary).values()) >= COHESION:
            return vocabulary
    return None


def sentence_ids(vocabulary: Vocabulary) -> tuple[np.ndarray, ...]:
    """The ids of every sentence of ``english.txt`` under ``vocabulary``, in file order."""
    return _stored_ids(vocabulary.file)


@cache
def _stored_ids(file: str) -> tuple[np.ndarray, ...]:
    with np.load(TEXT_FOLDER / file) as stored:
        ids, lengths = stored["ids"].astype(np.int64), stored["lengths"]
    return tuple(np.split(ids, np.cumsum(lengths)[:-1]))


def shipped_shape() -> tuple[int, int]:
    """The most sentences and the longest sentence's ids over ``VOCABULARIES``: samples enough
    for every sentence, and a length that truncates none."""
    texts = [sentence_ids(vocabulary) for vocabulary in VOCABULARIES]
    return max(len(text) for text in texts), max(len(ids) for text in texts for ids in text)


def known_text(graph: Graph, feeds: dict[str, np.ndarray]) -> KnownText | None:
    """``feeds`` (synthetic samples) with the token ids of every input read by a table of a
    recognised vocabulary replaced by sentences, one per sample, and the mask set to match (the
    module docstring); None when no input's table is recognised."""
    recognised = {}
    for name, value in feeds.items():
        table = embedding_table(graph, name) if value.ndim == 2 else None
        vocabulary = recognised_vocabulary(table) if table is not None else None
        if vocabulary is not None:
            recognised[name] = vocabulary
    if not recognised:
        return None
    vocabulary = next(iter(recognised.values()))
    sentences = sentence_ids(vocabulary)
    count = min(len(next(iter(feeds.values()))), len(sentences))
    data = {name: value[:count] for name, value in feeds.items()}
    length = next(iter(data[name] for name in recognised)).shape[1]
    ids, lengths = _padded(sentences[:count], length, vocabulary)
    for name in recognised:
        data[name] = ids.astype(data[name].dtype)
    for name, value in data.items():
        if attention_mask({name: value}) is not None and value.shape == ids.shape:
            data[name] = (np.arange(length) < lengths[:, None]).astype(value.dtype)
    kinds = ", ".join(vocabulary.kinds)
    return KnownText(data, f"data-free, {count} {SHIPPED}, as ids of the "
                           f"{vocabulary.name} vocabulary (recognised from the {vocabulary.rows}-row embedding: "
                           f"its {kinds} sit together)")


def _padded(sentences: tuple[np.ndarray, ...], length: int,
            vocabulary: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """``[n, length]`` ids of the sentences, each truncated to ``length`` (the separator kept
    last) and padded, and each one's length."""
    ids = np.full((len(sentences), length), vocabulary.padding, dtype=np.int64)
    lengths = np.minimum([len(s) for s in sentences], length)
    for row, (sentence, kept) in enumerate(zip(sentences, lengths)):
        ids[row, :kept] = sentence[:kept]
        if kept < len(sentence):
            ids[row, kept - 1] = vocabulary.separator
    return ids, lengths
