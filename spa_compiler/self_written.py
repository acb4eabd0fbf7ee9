"""Data-free text for a causal language model: the sequences it writes itself.

Token ids drawn from the vocabulary's prior (:mod:`.synthetic_tokens`) have the vocabulary's
frequencies but none of its grammar, and a language model's layers see other activations on
them than on text. A causal language model can write text like its training data. A model is
taken for one when its token input (integer ids read by an embedding table ``[V, width]``) has
an output of ``V`` scores per position (``[..., T, V]``, ``T`` the input's last axis), and its
scores at every position before the last stay the same when the last token changes (checked on
one sample; the last position's must change).

Writing: the first token of each sequence comes from the prior; then, for ``t = 0 .. T − 2``,
one run of the model over every sequence (as many per run as the model's batch allows) gives
the scores ``z`` at position ``t``, and token ``t + 1`` is drawn from ``softmax(z)`` (the model's
own distribution, temperature 1). Causality makes position ``t``'s scores depend on the tokens
before it only, so each sequence is a sample of the model's text. ``T − 1`` runs of the whole
model per batch: writing costs at most ``BUDGET_MACS`` (``(T − 1) × MACs per sequence`` each),
so a large model writes fewer sequences, and none when fewer than ``LEAST_SEQUENCES`` fit.

On the tiny Llama-style decoder of ``models/tiny_decoder.py`` (byte-level, 128 positions; it
writes 129 sequences) at ``--flops`` 0.75 / 0.5, held-out perplexity (unpruned 5.118) with the
default pipeline is 5.156 / 6.183 from prior tokens and 5.133 / 5.324 from its own text
(calibrated on 128 real training windows: 5.130 / 5.390); on the tiny GPT-2 (unpruned 4.672)
4.675 / 4.765 and 4.674 / 4.722 (calibrated 4.674 / 4.757).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from .analysis import Analysis
from .batch_axis import exact_batch, samples_per_run
from .sample_layout import run_samples
from .cost import node_macs
from .errors import first_line
from .ir import Graph
from .known_text import SHIPPED, known_text
from .synthetic_tokens import embedding_table
from .verify import reference_session

if TYPE_CHECKING:
    from .state import PruneState

__all__ = ["language_model_io", "write_sequences", "self_written", "written_once", "BUDGET_MACS", "LEAST_SEQUENCES"]

BUDGET_MACS = 2e12  # MACs writing may run (about 25 s of onnxruntime on two cores)
LEAST_SEQUENCES = 16  # fewer would be too little text: the prior's tokens are used instead
CAUSAL_RTOL = 1e-4  # scores before the changed position agree within this, relative to the largest


@dataclass(frozen=True)
class LanguageModelIO:
    """The token input and the output of per-position scores over the vocabulary."""

    tokens: str
    scores: str
    vocabulary: int


def language_model_io(graph: Graph) -> LanguageModelIO | None:
    """The graph's token input and its per-position vocabulary scores by shape (one token input
    ``[N, T]`` read by an embedding table of ``V`` rows, an output ``[..., T, V]``), or None."""
    tables = {name: embedding_table(graph, name) for name in graph.inputs}
    tokens = [(name, table) for name, table in tables.items() if table is not None]
    if len(tokens) != 1:
        return None
    name, table = tokens[0]
    shape = graph.input_shapes.get(name, ())
    if len(shape) != 2:
        return None
    for output in graph.outputs:
        scores = graph.shapes.get(output, ())
        if len(scores) >= 2 and tuple(scores[-2:]) == (shape[1], len(table)):
            return LanguageModelIO(name, output, len(table))
    return None


def _causal(scores: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray],
            io: LanguageModelIO) -> bool:
    """Whether changing the last token of one sample leaves every earlier position's scores as
    they were and changes the last position's (``scores``: the model's scores for samples)."""
    one = {name: array[:1] for name, array in feeds.items()}
    changed = {**one, io.tokens: one[io.tokens].copy()}
    changed[io.tokens][0, -1] = (changed[io.tokens][0, -1] + 1) % io.vocabulary
    before, after = scores(one).astype(np.float64), scores(changed).astype(np.float64)
    if before.shape != after.shape or before.ndim < 2:
        return False
    scale = float(np.max(np.abs(before))) or 1.0
    earlier = np.max(np.abs(before[..., :-1, :] - after[..., :-1, :])) <= CAUSAL_RTOL * scale
    return bool(earlier and np.max(np.abs(before[..., -1, :] - after[..., -1, :])) > CAUSAL_RTOL * scale)


def _draw(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``scores`` ``[n, V]``, drawn from ``softmax(scores)``."""
    probabilities = np.exp(scores - scores.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probabilities, axis=-1)
    cumulative /= cumulative[:, -1:]
    return np.minimum((cumulative < rng.random((len(scores), 1))).sum(axis=-1), scores.shape[-1] - 1)


def write_sequences(graph: Graph, feeds: dict[str, np.ndarray], io: LanguageModelIO, rng: np.random.Generator,
                    batch_size: int, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray] | None:
    """``feeds`` with every sequence's tokens after the first written by the model (see the
    module docstring); None when the model is not causal over its token input."""
    session, weights = reference_session(graph)
    output, exact = graph.outputs.index(io.scores), exact_batch(graph)

    def scores(samples: dict[str, np.ndarray]) -> np.ndarray:
        return run_samples(session, None, graph, samples, exact, weights)[output]

    if not _causal(scores, feeds, io):
        return None
    tokens = np.array(feeds[io.tokens], copy=True)
    count, length = tokens.shape
    per_run = samples_per_run(graph, batch_size, {io.scores})
    for position in range(length - 1):
        for start in range(0, count, per_run):
            part = {name: array[start:start + per_run] for name, array in feeds.items()}
            part[io.tokens] = tokens[start:start + per_run]
            written = scores(part)
            at = written.reshape(-1, *written.shape[-2:])[:, position].astype(np.float64)
            tokens[start:start + per_run, position + 1] = _draw(at, rng)
        if progress is not None:
            progress(position + 1, length - 1)
    return {**feeds, io.tokens: tokens.astype(feeds[io.tokens].dtype)}


@dataclass(frozen=True)
class SelfWritten:
    """Data-free text a run calibrates on, written by the model (:func:`self_written`) or the
    shipped sentences (:mod:`.known_text`): the samples (None: keep the prior's), a line for the
    report, and what the samples are (the report's words for the held-out ones)."""

    data: dict[str, np.ndarray] | None
    note: str
    samples: str = "sequences the model wrote"


def self_written(graph: Graph, feeds: dict[str, np.ndarray], macs_per_sample: float, batch_size: int, seed: int,
                 progress: Callable[[int, int], None] | None = None) -> SelfWritten:
    """The first sequences of ``feeds`` rewritten by the model, as many as ``BUDGET_MACS`` allows,
    or, for a model that is no causal language model or too costly to write with, None and why."""
    io = language_model_io(graph)
    if io is None:
        return SelfWritten(None, "")
    count, length = feeds[io.tokens].shape
    affordable = int(BUDGET_MACS // max(macs_per_sample * (length - 1), 1.0))
    if affordable < LEAST_SEQUENCES:
        return SelfWritten(None, f"too large to write {LEAST_SEQUENCES} sequences of its own within "
                                 f"{BUDGET_MACS:.0e} MACs, so prior tokens")
    count = min(count, affordable)
    first = {name: array[:count] for name, array in feeds.items()}
    try:
        written = write_sequences(graph, first, io, np.random.default_rng([seed, 1]), batch_size, progress)
    except (InvalidArgument, Fail, RuntimeException) as exc:  # e.g. a first axis that is no sample axis
        return SelfWritten(None, f"the model did not run to write sequences ({first_line(exc)}), so prior tokens")
    if written is None:
        return SelfWritten(None, "")
    return SelfWritten(written, f"data-free, sequences of {length} tokens the model wrote itself "
                                f"('{io.tokens}': first token from the vocabulary's prior, each next one drawn "
                                f"from its scores '{io.scores}' at the position before), {count} written")


def written_once(state: PruneState, analysis: Analysis, feeds: dict[str, np.ndarray]) -> SelfWritten:
    """Data-free text from ``feeds``, once per run: English sentences where the token ids are of
    a vocabulary spa-prune recognises (:mod:`.known_text`, unless ``known_text`` is off), else
    :func:`self_written` (unless ``self_written`` is off). The first pass that needs data-free
    samples (depth units, else the statistics) makes it from the model as it came in, and the
    text is kept in ``state.written`` for the next."""
    config = state.config
    if state.written is None:
        known = known_text(state.graph, feeds) if config.known_text else None
        if known is not None:
            state.written = SelfWritten(known.data, known.note, SHIPPED)
        elif config.self_written:
            def report(done: int, total: int) -> None:
                state.note(f"writing sequences with the model: position {done}/{total}")

            macs = sum(node_macs(analysis).values())
            state.written = self_written(state.graph, feeds, macs, config.calibration_batch, config.seed, report)
        else:
            state.written = SelfWritten(None, "")
    return state.written
