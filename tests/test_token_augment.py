"""Copies of few calibration sequences with replaced tokens (spa_compiler.token_augment)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from spa_compiler import PruneConfig, PruneState, analyze_graph
from spa_compiler.ir import load_model
from spa_compiler.stages import CollectStatistics
from spa_compiler.synthetic_tokens import token_prior
from spa_compiler.token_augment import (
    MAX_COPIES, REPLACED, TokenCopies, first_sequences, tokens_wanted, with_token_copies,
)
from tests.test_synthetic import _save, _token_model

LENGTH = 16


def _calibration(samples: int, real: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``samples`` sequences of ``real`` tokens (the first and last special: ids 1 and 2) padded
    to ``LENGTH``; token types 1 on the second half of the real tokens; positions 0, 1, ..."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((samples, LENGTH), dtype=np.int64)
    ids[:, :real] = rng.integers(40, 1000, (samples, real))
    ids[:, 0], ids[:, real - 1] = 1, 2
    mask = np.zeros_like(ids)
    mask[:, :real] = 1
    types = np.zeros_like(ids)
    types[:, real // 2 : real] = 1
    positions = np.broadcast_to(np.arange(LENGTH), ids.shape).copy()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}


def _unchanged(topped: TokenCopies, data: dict[str, np.ndarray]) -> bool:
    return topped.data is data and topped.copies == 0 and topped.note == ""


def test_copies_replace_inner_tokens_only(tmp_path):
    graph = _token_model(tmp_path)
    data = _calibration(samples=10, real=12)
    topped = with_token_copies(graph, data, wanted=10 * 12 + 30 * 12, seed=0)
    augmented = topped.data
    assert (topped.copies, topped.tokens, topped.wanted) == (30, 120, 480)  # (480 - 120 real tokens) / 12 per sample
    assert all(len(array) == 40 for array in augmented.values())
    for name in data:  # the samples first, unchanged
        assert np.array_equal(augmented[name][:10], data[name])
    sources = np.arange(30) % 10
    for name in ("attention_mask", "token_type_ids", "position_ids"):  # a copy's other inputs are its source's
        assert np.array_equal(augmented[name][10:], data[name][sources])
    original, copied = data["input_ids"][sources], augmented["input_ids"][10:]
    changed = copied != original
    assert not changed[:, 0].any() and not changed[:, 11:].any()  # special tokens and padding kept
    inner = 30 * 10
    spread = np.sqrt(REPLACED * (1 - REPLACED) / inner)  # binomial: 300 inner tokens, each replaced or not
    assert abs(changed.sum() / inner - REPLACED) < 3 * spread  # 104 of 300 replaced (0.347; 3 spreads: 0.085)
    prior = token_prior(graph.constants["words"]).probabilities
    assert (prior[copied[changed]] > 0).all()  # drawn from the vocabulary's prior


def test_no_copies_when_tokens_suffice_or_no_vocabulary(tmp_path):
    graph = _token_model(tmp_path)
    data = _calibration(samples=10, real=12)
    assert _unchanged(with_token_copies(graph, data, wanted=120, seed=0), data)
    few = with_token_copies(graph, _calibration(samples=2, real=4), wanted=10_000, seed=0)
    assert few.copies == 2 * MAX_COPIES and len(few.data["input_ids"]) == 2 + 2 * MAX_COPIES
    floats = {"x": np.zeros((4, LENGTH), dtype=np.float32)}
    assert _unchanged(with_token_copies(graph, floats, wanted=10_000, seed=0), floats)


def _token_encoder(tmp_path):
    """ids → Gather on a [1000, 16] table, masked, → MatMul 16→64 → Relu → MatMul 64→16."""
    rng = np.random.default_rng(1)
    shapes = {"words": (1000, 16), "up": (16, 64), "down": (64, 16)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["mu"]),
        helper.make_node("Mul", ["e", "mu"], ["x"]),
        helper.make_node("MatMul", ["x", "up"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "down"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, LENGTH]) for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, LENGTH, 16])]
    return _save(tmp_path, nodes, inputs, outputs, {**weights, "axis": np.array([2], dtype=np.int64)}, "encoder.onnx")


def _calibrated(tmp_path, graph, data, **options):
    """CollectStatistics on ``data`` saved as the ``--calib`` file."""
    np.savez(tmp_path / "calib.npz", input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    config = PruneConfig(flops=0.5, calibration=str(tmp_path / "calib.npz"), **options)
    state = PruneState(config, graph=graph)
    state.analysis = analyze_graph(graph)
    return CollectStatistics().run(state)


def test_first_sequences_until_their_real_tokens_suffice(tmp_path):
    graph = _token_model(tmp_path)
    data = _calibration(samples=10, real=12)
    data["attention_mask"][1::2, 6:] = 0  # samples of 12 and 6 real tokens in turn: 12, 18, 30, 36, 48, ...
    assert len(first_sequences(graph, data, wanted=40, least=2)["input_ids"]) == 5
    assert len(first_sequences(graph, data, wanted=36, least=2)["position_ids"]) == 4
    assert len(first_sequences(graph, data, wanted=36, least=7)["attention_mask"]) == 7
    assert len(first_sequences(graph, data, wanted=10_000, least=2)["input_ids"]) == 10
    floats = {"x": np.zeros((10, LENGTH), dtype=np.float32)}
    assert len(first_sequences(graph, floats, wanted=10_000, least=3)["x"]) == 3


def test_calibration_gets_copies_until_the_widest_layer_has_its_rows(tmp_path):
    graph = load_model(_token_encoder(tmp_path))

    def calibrated(**options):
        return _calibrated(tmp_path, graph, _calibration(samples=8, real=6), **options)

    assert tokens_wanted(graph, [s.layer for s in calibrated(token_copies=False).statistics.values()]) == 4 * 65
    state = calibrated()
    # 8 samples of 6 real tokens: 48 tokens, (260 - 48) / 6 -> 36 copies
    assert len(state.calibration_data["input_ids"]) == 8 + 36
    assert state.calibration.endswith("and 36 copies of them with 40% of their tokens replaced (their 48 real "
                                      "tokens are fewer than the 260 the widest layer wants: more sequences "
                                      "would serve it better)")
    plain = calibrated(token_copies=False)
    assert len(plain.calibration_data["input_ids"]) == 8 and "tokens replaced" not in plain.calibration


def test_a_larger_file_gives_more_real_sequences_unless_the_samples_are_given(tmp_path):
    graph = load_model(_token_encoder(tmp_path))
    data = _calibration(samples=400, real=2)  # the default 128 samples hold 256 real tokens of the 260 wanted
    state = _calibrated(tmp_path, graph, data)
    assert np.array_equal(state.calibration_data["input_ids"], data["input_ids"][:130])  # 130 x 2 >= 260
    assert np.array_equal(state.held_out["input_ids"], data["input_ids"][-32:])
    assert state.calibration.endswith("130 samples from " + str(tmp_path / "calib.npz") + " (more than the default "
                                      "128: the widest layer wants 260 real tokens; 32 more held out to measure fidelity)")
    given = _calibrated(tmp_path, graph, data, calibration_samples=128)
    assert len(given.calibration_data["input_ids"]) == 112 and len(given.held_out["input_ids"]) == 16
    plain = _calibrated(tmp_path, graph, data, token_copies=False)
    assert len(plain.calibration_data["input_ids"]) == 112


def test_no_copies_of_other_inputs_or_of_sequences_without_inner_tokens(tmp_path):
    graph = _token_model(tmp_path)
    data = _calibration(samples=10, real=12)
    with_cache = {**data, "past": np.zeros((10, 2, 4, 8), dtype=np.float32)}
    assert _unchanged(with_token_copies(graph, with_cache, wanted=10_000, seed=0), with_cache)
    pairs = _calibration(samples=10, real=2)  # a first and a last token only: nothing to replace
    assert _unchanged(with_token_copies(graph, pairs, wanted=10_000, seed=0), pairs)
