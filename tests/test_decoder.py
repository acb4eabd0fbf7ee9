"""Decoder LLMs (Llama, Qwen2, Mistral from ``transformers`` configs): grouped-query attention,
written-out RMSNorm and rotary embeddings, SwiGLU, tied embeddings. GPT-2: one packed ``c_attn``
Gemm split into queries, keys and values, whose head dimensions rotate and prune.

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
        "llama dynamic cache": export_decoder(llama, folder / "llama_dynamic_cache.onnx", sequence=4, cache=8,
                                              dynamic=True),
        "gpt2 classic": export_decoder(build_decoder("gpt2", kv_heads=4), folder / "gpt2.onnx"),
        "gpt2 dynamo": export_decoder(build_decoder("gpt2", kv_heads=4), folder / "gpt2_dynamo.onnx", dynamo=True),
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


def test_dynamic_cache_prunes_query_heads_within_groups_and_takes_any_length(decoders, tmp_path):
    """Batch, sequence and past length free, as optimum exports: the classic exporter writes the
    repeat of the key/value heads as ``Expand`` to ``Where(Equal(t, -1), 1, t)`` with ``t`` a
    Concat of run-time sizes and the repeat count, which is followed: the query heads within each
    group are units, as with a static cache (they were blocked), exactly, and the pruned model
    takes another batch, sequence and past length."""
    shapes = {"input_ids": (1, 4), "attention_mask": (1, 12),
              **{f"past_key_values.{i}.{kv}": (1, 2, 8, 16) for i in range(2) for kv in ("key", "value")}}
    source = decoders["llama dynamic cache"]
    assert _kinds(analyze_graph(load_model(source, shapes))) == [("channels", 2, 2)] * 2 + [("channels", 128, 128)] * 2
    assert_exact(randomize_weights(load_model(source, shapes), seed=2), PruneConfig(ratio=0.5, round_to=1))
    prune(source, tmp_path / "cache.onnx", PruneConfig(ratio=0.5, round_to=1, bench_runs=0, input_shapes=shapes))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 128, (2, 3)), "attention_mask": np.ones((2, 14), np.int64),
             **{f"past_key_values.{i}.{kv}": rng.standard_normal((2, 2, 11, 16), np.float32)
                for i in range(2) for kv in ("key", "value")}}
    logits, present = run_model(onnx.load(str(tmp_path / "cache.onnx")), feeds)[:2]
    assert logits.shape == (2, 3, 128) and present.shape == (2, 2, 14, 16)


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


GPT2_HIDDEN, GPT2_HEADS, GPT2_DIM = 64, 4, 16


def _gpt2_dims(analysis):
    return [g for g in analysis.groups if analysis.kind(g) == "head dims"]


def test_gpt2_packed_projection_units_hold_every_role_of_one_head_dimension(decoders):
    """``c_attn`` (a Gemm, split along its outputs into q, k, v): with head dimensions, position
    d of every head's query, key and value is one unit (as in onnxruntime's fused Attention),
    with the output projection's rows of the values; each layer's group rotates (queries and
    keys, values and output) and the rotation keeps the outputs within float32 rounding."""
    from spa_compiler.attention_heads import rotatable_heads
    from spa_compiler.head_rotation import RotateHeads, rotate_heads

    graph = load_model(decoders["gpt2 classic"])
    analysis = analyze_graph(graph, head_dims=True)
    dims = _gpt2_dims(analysis)
    assert len(dims) == 2 and all(len(g.units) == GPT2_DIM == len(g.prunable) for g in dims)
    c_attn = analysis.axis_id("model.transformer.h.0.attn.c_attn.weight", 1)
    c_proj = analysis.axis_id("model.transformer.h.0.attn.c_proj.weight", 0)
    (first,) = [g for g in dims if c_attn in g.axes]
    heads = np.arange(GPT2_HEADS) * GPT2_DIM + 3
    np.testing.assert_array_equal(first.units[3].members[c_attn],
                                  np.concatenate([part * GPT2_HIDDEN + heads for part in range(3)]))
    np.testing.assert_array_equal(first.units[3].members[c_proj], heads)
    bases = rotatable_heads(analysis)
    assert len(bases) == 2
    query, key = bases[0].query_key
    value, output = bases[0].value_output
    assert [p.layer.op_type for p in (query, key, value, output)] == ["Gemm"] * 4
    np.testing.assert_array_equal(query.heads[:, 3], heads)
    np.testing.assert_array_equal(key.heads[:, 3], GPT2_HIDDEN + heads)
    np.testing.assert_array_equal(value.heads[:, 3], 2 * GPT2_HIDDEN + heads)
    data = {"input_ids": np.random.default_rng(0).integers(0, 128, (32, 16))}
    kept, error = RotateHeads._exact(graph, rotate_heads(graph, bases, data, {}), data)
    assert len(kept) == 2 and error < 1e-5


def test_gpt2_dynamo_export_rotates_its_head_dimensions_too(decoders):
    from spa_compiler.attention_heads import rotatable_heads

    analysis = analyze_graph(load_model(decoders["gpt2 dynamo"]), head_dims=True)
    assert [len(g.units) for g in _gpt2_dims(analysis)] == [GPT2_DIM, GPT2_DIM]
    assert len(rotatable_heads(analysis)) == 2


def test_gpt2_head_dimensions_prune_exactly(decoders):
    """With the queries' and keys' last 8 dimensions zeroed in every head, L2 removes those 8
    units (their values read by no output projection row after the harness zeroes them): the
    pruned model equals the zeroed original, c_attn keeps 3 x 4 heads x 8 columns and the head
    count stays."""
    graph = load_model(decoders["gpt2 classic"])
    last = (np.arange(GPT2_HEADS)[:, None] * GPT2_DIM + np.arange(GPT2_DIM // 2, GPT2_DIM)).ravel()
    query_key = np.concatenate([last, GPT2_HIDDEN + last])
    for layer in range(2):
        for name in (f"model.transformer.h.{layer}.attn.c_attn.weight", f"model.transformer.h.{layer}.attn.c_attn.bias"):
            zeroed = graph.constants[name].copy()
            zeroed[..., query_key] = 0
            graph.set_constant(name, zeroed)
    config = PruneConfig(ratio=0.5, round_to=1, head_dims=True, criterion="l2")
    pruned = assert_exact(graph, config, rtol=1e-5)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert weights["model.transformer.h.0.attn.c_attn.weight"].shape == (GPT2_HIDDEN, 3 * GPT2_HIDDEN // 2)
    assert weights["model.transformer.h.1.attn.c_proj.weight"].shape == (GPT2_HIDDEN // 2, GPT2_HIDDEN)


@pytest.mark.accurate
def test_gpt2_default_pipeline_prunes_rotated_head_dimensions(decoders, tmp_path):
    """Left unset, the default pipeline (statistics) makes GPT-2's head dimensions the units,
    rotates both layers' heads (outputs kept within 1e-5) and reaches the target."""
    state = prune_graph(load_model(decoders["gpt2 classic"]), PruneConfig(flops=0.6, round_to=4))
    assert len(_gpt2_dims(state.analysis)) == 2 and len(state.rotation.energies) == 2
    assert state.rotation.dropped == 0 and state.rotation.error <= 1e-5
    assert state.plan.achieved == pytest.approx(0.6, abs=0.02)
    removed = [len(state.plan.removed.get(g.id, [])) for g in _gpt2_dims(state.analysis)]
    assert sum(removed) > 0, removed
