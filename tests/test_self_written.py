"""Data-free text for causal language models: the sequences a model writes itself
(spa_compiler.self_written)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler import PruneConfig, load_model, prune_graph
from spa_compiler import self_written as written_module
from spa_compiler.self_written import LEAST_SEQUENCES, language_model_io, self_written, write_sequences

VOCABULARY, LENGTH, WIDTH = 12, 10, 16


def _successor_model(path, causal: bool = True, batch: int = 1, reshaped: bool = False):
    """``input_ids [N, T] -> logits [N, T, V]``: position t's scores are 40 at the successor
    ``(id + 5) mod V`` of token t and 0 elsewhere, through an embedding table and a projection
    (a first-order language model, causal); or (``causal`` False) with every position's
    embedding shifted by the sequence's mean embedding, which reads later tokens. Declared for
    ``batch`` sequences; ``reshaped``: the embeddings pass a Reshape to the constant
    ``[batch, T, width]``, as exports that fold the batch write it."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCABULARY, WIDTH)).astype(np.float32)
    successor = np.eye(VOCABULARY, dtype=np.float32)[(np.arange(VOCABULARY) + 5) % VOCABULARY] * 40
    projection = np.linalg.lstsq(table, successor, rcond=None)[0].astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["gathered"])]
    nodes.append(helper.make_node("Reshape", ["gathered", "shape"], ["embedded"]) if reshaped
                 else helper.make_node("Identity", ["gathered"], ["embedded"]))
    hidden = "embedded"
    if not causal:
        nodes += [helper.make_node("ReduceMean", ["embedded", "axis1"], ["mean"], keepdims=1),
                  helper.make_node("Add", ["embedded", "mean"], ["mixed"])]
        hidden = "mixed"
    nodes.append(helper.make_node("MatMul", [hidden, "projection"], ["logits"]))
    graph = helper.make_graph(
        nodes, "successor",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, LENGTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, LENGTH, VOCABULARY])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(projection, "projection"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
         numpy_helper.from_array(np.array([batch, LENGTH, WIDTH], dtype=np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return load_model(path)


def _prior_feeds(count: int = 20) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(1).integers(0, VOCABULARY, (count, LENGTH))}


def test_a_language_model_is_found_by_its_token_input_and_vocabulary_scores(tmp_path):
    io = language_model_io(_successor_model(tmp_path / "lm.onnx"))
    assert (io.tokens, io.scores, io.vocabulary) == ("input_ids", "logits", VOCABULARY)


def test_written_sequences_follow_the_models_own_distribution(tmp_path):
    """Each next token is drawn from the scores at the position before: with the successor
    nearly certain (probability 1 − 11e−40/(1 + ...)), every sequence is its first token's chain
    ``x, x + 5, x + 10, ...`` mod 12, exactly; the first tokens are the prior's."""
    graph = _successor_model(tmp_path / "lm.onnx")
    feeds = _prior_feeds()
    done = []
    tokens = write_sequences(graph, feeds, language_model_io(graph), np.random.default_rng(0), 8,
                             lambda position, total: done.append((position, total)))["input_ids"]
    np.testing.assert_array_equal(tokens[:, 0], feeds["input_ids"][:, 0])
    np.testing.assert_array_equal(tokens[:, 1:], (tokens[:, :-1] + 5) % VOCABULARY)
    assert done[-1] == (LENGTH - 1, LENGTH - 1) and tokens.dtype == feeds["input_ids"].dtype


def test_a_model_whose_earlier_scores_read_later_tokens_writes_nothing(tmp_path):
    graph = _successor_model(tmp_path / "mixed.onnx", causal=False)
    assert language_model_io(graph) is not None
    assert write_sequences(graph, _prior_feeds(), language_model_io(graph), np.random.default_rng(0), 8) is None
    assert self_written(graph, _prior_feeds(), 1e3, 8, 0).data is None


def test_writing_is_bounded_by_its_budget(tmp_path, monkeypatch):
    """As many sequences as ``BUDGET_MACS`` pays for at ``(T − 1) × MACs`` each; none, and the
    report says why, when fewer than ``LEAST_SEQUENCES`` fit."""
    graph = _successor_model(tmp_path / "lm.onnx")
    monkeypatch.setattr(written_module, "BUDGET_MACS", 17 * (LENGTH - 1) * 1e3)
    result = self_written(graph, _prior_feeds(), 1e3, 8, 0)
    assert len(result.data["input_ids"]) == 17 and "17 written" in result.note
    monkeypatch.setattr(written_module, "BUDGET_MACS", (LEAST_SEQUENCES - 1) * (LENGTH - 1) * 1e3)
    result = self_written(graph, _prior_feeds(), 1e3, 8, 0)
    assert result.data is None and "prior tokens" in result.note


@pytest.mark.parametrize("inside", [False, True], ids=["free-in-a-copy", "fixed-inside"])
def test_a_model_declaring_a_batch_of_two_writes_its_sequences(tmp_path, inside):
    """A first axis fixed at 2: the runs' copies free it, or, where a Reshape holds it inside,
    every run holds exactly two sequences (the causality probe's one topped up with a copy). The
    sequences are the successor chains of their first tokens all the same."""
    graph = _successor_model(tmp_path / "pairs.onnx", batch=2, reshaped=inside)
    result = self_written(graph, _prior_feeds(count=19), 1e3, 8, 0)
    tokens = result.data["input_ids"]
    assert len(tokens) == 19 and "19 written" in result.note
    np.testing.assert_array_equal(tokens[:, 1:], (tokens[:, :-1] + 5) % VOCABULARY)


def test_a_model_that_does_not_run_to_write_keeps_the_prior_and_says_so_in_one_line(tmp_path, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def refuse(*args, **kwargs):
        raise InvalidArgument("Got invalid dimensions for input: input_ids\nindex: 0 Got: 1 Expected: 3")

    monkeypatch.setattr(written_module, "write_sequences", refuse)
    result = self_written(_successor_model(tmp_path / "lm.onnx"), _prior_feeds(), 1e3, 8, 0)
    assert result.data is None and result.note.startswith("the model did not run to write sequences (Got invalid")
    assert result.note.endswith("), so prior tokens") and "\n" not in result.note


@pytest.mark.accurate
def test_data_free_pipeline_calibrates_a_decoder_on_its_own_text(tmp_path):
    """The default pipeline, data-free, on a Llama-style decoder: its statistics come from
    sequences it wrote, an eighth of them (at most 32) held out to measure fidelity on."""
    pytest.importorskip("torch")
    from models.decoders import build_decoder, export_decoder

    graph = load_model(export_decoder(build_decoder("llama"), tmp_path / "llama.onnx"))
    state = prune_graph(graph, PruneConfig(flops=0.6))
    found = re.search(r"(\d+) written, (\d+) of them held out", state.calibration)
    assert found and "the model wrote itself" in state.calibration, state.calibration
    count, held = int(found[1]), int(found[2])
    assert count >= LEAST_SEQUENCES and held == min(count // 8, 32) == len(state.held_out["input_ids"])
    assert state.held_out_fidelity.source == f"{held} sequences the model wrote that the statistics did not see"
    assert state.plan.achieved == pytest.approx(0.6, abs=0.03)
