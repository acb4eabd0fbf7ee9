"""Decoder LLMs (Llama, Qwen2, Mistral from ``transformers`` configs): grouped-query attention,
written-out RMSNorm and rotary embeddings, SwiGLU, tied embeddings.

Without a cache they prune to half their FLOPs with the interface unchanged (whole key/value
groups and FFN neurons), exactly. With a key/value cache in the interface, the default keeps
every input and output shape and prunes FFN neurons and query heads within each key/value group;
``allow_io_change`` lets the cache lose key/value heads, and the report lists the new shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import assert_exact, randomize_weights
from models.exactness import relative_error, zero_readers
from spa_compiler import PruneConfig, analyze_graph, load_model, prune, prune_graph, synthetic_inputs
from spa_compiler.interface import interface_changes, narrow_all, resize_declarations
from spa_compiler.rewrite import rewrite_model
from spa_compiler.verify import run_model

torch = pytest.importorskip("torch")
from models.decoders import build_decoder, export_decoder  # noqa: E402

CACHE_IO = ("past_key_values.*", "present.*")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    llama = build_decoder("llama")
    return {
        "llama classic": export_decoder(llama, folder / "llama.onnx"),
        "llama dynamo": export_decoder(llama, folder / "llama_dynamo.onnx", dynamo=True),
        "qwen2 classic": export_decoder(build_decoder("qwen2"), folder / "qwen2.onnx"),
        "mistral classic": export_decoder(build_decoder("mistral", kv_heads=1), folder / "mistral.onnx"),
        "llama cache": export_decoder(llama, folder / "llama_cache.onnx", sequence=4, cache=8),
    }


def _interface(path):
    model = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]]


def _kinds(analysis):
    return sorted((analysis.kind(g), len(g.units), len(g.prunable)) for g in analysis.groups if g.prunable)


@pytest.mark.parametrize("name", ["llama classic", "llama dynamo", "qwen2 classic", "mistral classic"])
def test_decoder_prunes_to_half_its_flops_with_its_interface(decoders, tmp_path, name):
    source = decoders[name]
    report = prune(source, tmp_path / "half.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert report.flops_ratio == pytest.approx(0.5, abs=0.02)
    assert _interface(tmp_path / "half.onnx") == _interface(source)
    assert report.fidelity.cosine > 0.9


def test_key_value_groups_and_ffn_neurons_are_the_units(decoders):
    analysis = analyze_graph(load_model(decoders["llama classic"]))
    assert _kinds(analysis) == [("channels", 2, 2)] * 2 + [("channels", 128, 128)] * 2
    mistral = analyze_graph(load_model(decoders["mistral classic"]))  # one key/value head: the 4 query heads
    assert _kinds(mistral) == [("channels", 4, 4)] * 2 + [("channels", 128, 128)] * 2


@pytest.mark.parametrize("name", ["llama classic", "llama dynamo", "qwen2 classic"])
def test_pruned_decoder_is_exact(decoders, name):
    graph = randomize_weights(load_model(decoders[name]), seed=1)
    assert_exact(graph, PruneConfig(ratio=0.5, round_to=1))


def test_cache_keeps_the_interface_by_default_pruning_query_heads_within_groups(decoders, tmp_path):
    source = decoders["llama cache"]
    analysis = analyze_graph(load_model(source))
    # per layer: query heads within the 2 key/value groups (2 per group: 2 units), FFN neurons
    assert _kinds(analysis) == [("channels", 2, 2)] * 2 + [("channels", 128, 128)] * 2
    report = prune(source, tmp_path / "cache.onnx", PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert report.interface == []
    assert _interface(tmp_path / "cache.onnx") == _interface(source)
    pruned = onnx.load(str(tmp_path / "cache.onnx"))
    projections = sorted(tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2 and 64 in t.dims)
    # per layer: q keeps 2 of 4 heads of 16 (64x32), k and v keep their 2 (64x32), o reads 32 (32x64),
    # the FFN keeps 64 of 128 neurons; the (tied) embedding and output projection stay
    assert projections == [(32, 64)] * 2 + [(64, 32)] * 6 + [(64, 64)] * 6 + [(64, 128), (128, 64)]
    assert_exact(randomize_weights(load_model(source), seed=2), PruneConfig(ratio=0.5, round_to=1))


def test_cache_loses_key_value_heads_when_allowed(decoders, tmp_path):
    source = decoders["llama cache"]
    config = PruneConfig(ratio=0.5, round_to=1, bench_runs=0, allow_io_change=CACHE_IO)
    report = prune(source, tmp_path / "cache_io.onnx", config)
    assert report.interface == [
        *(f"input 'past_key_values.{i}.{kv}' 1x2x8x16 -> 1x1x8x16" for i in range(2) for kv in ("key", "value")),
        *(f"output 'present.{i}.{kv}' 1x2x12x16 -> 1x1x12x16" for i in range(2) for kv in ("key", "value")),
    ]
    shapes = {name: dims for name, _, dims in _interface(tmp_path / "cache_io.onnx")}
    assert shapes["past_key_values.1.value"] == [1, 1, 8, 16] and shapes["logits"] == [1, 4, 128]

    # exact: the removed key/value groups' readers zeroed, the cache fed without their heads
    graph = randomize_weights(load_model(source), seed=3)
    state = prune_graph(graph, config)
    zero_readers(graph, state.analysis, state.removed_by_axis)
    pruned = rewrite_model(state.analysis, state.removed_by_axis)
    resize_declarations(pruned, interface_changes(state.analysis, state.removed_by_axis))
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, 0)
    expected = list(narrow_all(state.analysis, state.removed_by_axis,
                               dict(zip(graph.outputs, run_model(graph.model, feeds)))).values())
    actual = run_model(pruned, narrow_all(state.analysis, state.removed_by_axis, feeds))
    assert [a.shape for a in actual][1] == (1, 1, 12, 16)
    assert relative_error(expected, actual) <= 1e-4
    assert np.allclose(expected[0], actual[0], rtol=1e-4, atol=1e-4)
