"""onnxruntime's fused contrib ops (``com.microsoft``): one exactness test per op.

Attention-type ops are tested on token graphs ``x[1, 6, 32] -> projections -> fused op (4 heads
of 8) -> output projection -> y``: the plan removes half the heads (``--ratio 0.5``), the
exactness harness zeroes the output projection's rows that read them, prunes, and onnxruntime's
outputs of the zeroed original and of the pruned model must agree within 1e-5 (relative L2). The
tests also assert what the rules rewrite: packed weight columns, biases, ``num_heads`` and
``kv_num_heads``. The normalisations keep the hidden axis (a barrier) and pass the leading axes
through: the conv chain of ``test_op_rules`` prunes channels on a leading axis through them.

End to end, all-MiniLM-L6-v2 and a GPT-2 after ``onnxruntime.transformers.optimizer`` prune like
their exports.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest

from helpers import assert_exact
from models.sentences import ENCODER_INPUTS, SENTENCES, embed, mean_cosine, tokenize
from test_op_rules import CONFIG, RTOL, attr, build, initializer, nodes, prune_exact, shapes_of
from spa_compiler import PruneConfig, analyze_graph, load_model, prune, prune_graph, synthetic_inputs
from spa_compiler.synthetic import synthetic_calibration
from spa_compiler.verify import run_model

MS = {"com.microsoft": 1}
HEADS, D, HIDDEN, SEQ = 4, 8, 32, 6
TOKENS = f"float[1,{SEQ},{HIDDEN}] x"
OUT = f"float[1,{SEQ},{HIDDEN}] y"


def weight(*shape: int, seed: int = 0) -> np.ndarray:
    """Seeded float32 weights scaled by the fan-in, so softmaxes do not saturate."""
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def token_graph(tmp_path, body: str, consts: dict, inputs: str = TOKENS, outputs: str = OUT):
    text = f"g ({inputs}) => ({outputs}) {{\n{body}\n}}"
    return build(tmp_path, text, 17, consts, domains=MS)


WHOLE_HEADS = dataclasses.replace(CONFIG, head_dims=False)  # the default would take head dimensions


def heads_groups(analysis):
    return [(len(g.units), len(g.prunable)) for g in analysis.groups if analysis.kind(g) == "heads"]


# -- Attention --------------------------------------------------------------------------------

ATTENTION_BODY = """
    ctx = com.microsoft.Attention <num_heads = 4{extra}> (x, Wqkv, Bqkv{mask})
    y = MatMul (ctx, Wo)
"""


PADDING_MASK = np.array([[1, 1, 1, 1, 0, 0]], np.int32)


@pytest.mark.parametrize("extra, mask", [("", ""), (", unidirectional = 1", ""), ("", ", Mask")],
                         ids=["plain", "unidirectional", "padding_mask"])
def test_attention_prunes_whole_heads_exactly(tmp_path, extra, mask):
    graph = token_graph(tmp_path, ATTENTION_BODY.format(extra=extra, mask=mask),
                        {"Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=1), "Bqkv": weight(3 * HIDDEN, seed=2),
                         "Wo": weight(HIDDEN, HIDDEN, seed=3), "Mask": PADDING_MASK})
    analysis = analyze_graph(graph)
    (heads,) = [g for g in analysis.groups if analysis.kind(g) == "heads"]
    for h, unit in enumerate(heads.units):
        columns = unit.members[analysis.axis_id("Wqkv", 1)]
        np.testing.assert_array_equal(columns, np.concatenate([part * HIDDEN + h * D + np.arange(D) for part in range(3)]))
    pruned = assert_exact(graph, WHOLE_HEADS, rtol=RTOL)
    assert shapes_of(pruned, ["Wqkv", "Bqkv", "Wo"]) == {"Wqkv": (32, 48), "Bqkv": (48,), "Wo": (16, 32)}
    assert attr(nodes(pruned, "Attention")[0], "num_heads") == 2


def test_attention_with_a_past_state_allowed_to_change(tmp_path):
    """past [2, B, heads, P, D] and present are the interface: heads stay by default; with
    --allow-io-change they go with the heads, and the pruned model runs on the narrower state."""
    body = """
        ctx, present = com.microsoft.Attention <num_heads = 4, unidirectional = 1> (x, Wqkv, Bqkv, , past)
        y = MatMul (ctx, Wo)
    """
    inputs = f"{TOKENS}, float[2,1,4,3,{D}] past"
    graph = token_graph(tmp_path, body, {"Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=1), "Bqkv": weight(3 * HIDDEN, seed=2),
                                         "Wo": weight(HIDDEN, HIDDEN, seed=3)}, inputs, f"{OUT}, float[2,1,4,9,{D}] present")
    assert heads_groups(analyze_graph(graph)) == [(4, 0)]
    config = PruneConfig(ratio=0.5, round_to=1, allow_io_change=("past", "present"))
    pruned = prune_graph(graph, config).model
    assert attr(nodes(pruned, "Attention")[0], "num_heads") == 2
    feeds = synthetic_inputs({**graph.input_shapes, "past": (2, 1, 2, 3, D)}, graph.dtypes)
    assert [o.shape for o in run_model(pruned, feeds)] == [(1, SEQ, HIDDEN), (2, 1, 2, 9, D)]


def test_attention_with_a_smaller_value_size_prunes_whole_heads_exactly(tmp_path):
    """qkv_hidden_sizes [32, 32, 16]: heads of 8 query/key and 4 value dimensions."""
    body = """
        ctx = com.microsoft.Attention <num_heads = 4, qkv_hidden_sizes = [32, 32, 16]> (x, Wqkv, Bqkv)
        y = MatMul (ctx, Wo)
    """
    graph = token_graph(tmp_path, body, {"Wqkv": weight(HIDDEN, 80, seed=1), "Bqkv": weight(80, seed=2),
                                         "Wo": weight(16, HIDDEN, seed=3)})
    assert heads_groups(analyze_graph(graph)) == [(4, 4)]
    pruned = prune_exact(graph)[1]
    assert shapes_of(pruned, ["Wqkv", "Bqkv", "Wo"]) == {"Wqkv": (32, 40), "Bqkv": (40,), "Wo": (8, 32)}
    assert (attr(nodes(pruned, "Attention")[0], "num_heads"),
            attr(nodes(pruned, "Attention")[0], "qkv_hidden_sizes")) == (2, [16, 16, 8])


def test_attention_with_unequal_query_and_key_sizes_is_a_barrier(tmp_path):
    """onnxruntime refuses such a model too (its output's shape stays unknown)."""
    body = """
        ctx = com.microsoft.Attention <num_heads = 4, qkv_hidden_sizes = [32, 16, 32]> (x, Wqkv, Bqkv)
        y = MatMul (ctx, Wo)
    """
    graph = token_graph(tmp_path, body, {"Wqkv": weight(HIDDEN, 80), "Bqkv": weight(80), "Wo": weight(HIDDEN, HIDDEN)})
    analysis = analyze_graph(graph)
    assert heads_groups(analysis) == []
    assert ("Attention", "qkv_hidden_sizes [32, 16, 32] are not Q and K of one size and V filling 80 columns") in [
        (b.op_type, b.reason) for b in analysis.barriers]


def _head_dims(analysis) -> list:
    return [g for g in analysis.groups if analysis.kind(g) == "head dims"]


def test_attention_prunes_head_dimensions_exactly(tmp_path):
    """--head-dims: position d of every head's query, key and value (and the output) is one
    unit; the head count stays and the original scale 1/√8 is written. The odd dimensions'
    queries are zeroed so that removing them is exact (Q·Kᵀ reads them through no weight); the
    harness zeroes the output projection's rows of the removed values."""
    graph = token_graph(tmp_path, ATTENTION_BODY.format(extra="", mask=", Mask"),
                        {"Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=1), "Bqkv": weight(3 * HIDDEN, seed=2),
                         "Wo": weight(HIDDEN, HIDDEN, seed=3), "Mask": PADDING_MASK})
    odd = (np.arange(HEADS)[:, None] * D + np.arange(1, D, 2)).ravel()
    for name in ("Wqkv", "Bqkv"):
        zeroed = graph.constants[name].copy()
        zeroed[..., odd] = 0
        graph.set_constant(name, zeroed)
    analysis = analyze_graph(graph, head_dims=True)
    (dims,) = _head_dims(analysis)
    assert (len(dims.units), len(dims.prunable)) == (D, D)
    np.testing.assert_array_equal(dims.units[3].members[analysis.axis_id("Wqkv", 1)],
                                  np.concatenate([part * HIDDEN + np.arange(HEADS) * D + 3 for part in range(3)]))
    np.testing.assert_array_equal(dims.units[3].members[analysis.axis_id("ctx", 2)], np.arange(HEADS) * D + 3)
    pruned = assert_exact(graph, PruneConfig(ratio=0.5, round_to=1, head_dims=True, criterion="l2"), rtol=1e-5)
    (node,) = nodes(pruned, "Attention")
    assert shapes_of(pruned, ["Wqkv", "Bqkv", "Wo"]) == {"Wqkv": (32, 48), "Bqkv": (48,), "Wo": (16, 32)}
    assert (attr(node, "num_heads"), attr(node, "qkv_hidden_sizes")) == (4, None)
    assert attr(node, "scale") == pytest.approx(1 / np.sqrt(D))
    even = graph.constants["Wqkv"].reshape(HIDDEN, 3, HEADS, D)[..., ::2]
    np.testing.assert_array_equal(initializer(pruned, "Wqkv").reshape(HIDDEN, 3, HEADS, D // 2), even)


@pytest.mark.accurate
def test_attention_head_dimensions_rotate_and_prune_within_the_tolerance(tmp_path):
    """The default pipeline on an Attention model (data-free): its head dimensions are rotated,
    the outputs kept within float32 rounding, and the pruned model runs in onnxruntime with
    its FLOPs within one unit below the target."""
    from spa_compiler.attention_heads import rotatable_heads

    graph = token_graph(tmp_path, ATTENTION_BODY.format(extra="", mask=""),
                        {"Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=1), "Bqkv": weight(3 * HIDDEN, seed=2),
                         "Wo": weight(HIDDEN, HIDDEN, seed=3)})
    (basis,) = rotatable_heads(analyze_graph(graph, head_dims=True))
    assert [p.layer.op_type for p in [*basis.query_key, *basis.value_output]] == ["Attention", "Attention", "Attention", "MatMul"]
    state = prune_graph(graph, PruneConfig(flops=0.7, round_to=1))
    assert len(_head_dims(state.analysis)) == 1 and len(state.rotation.energies) == 1
    assert state.rotation.dropped == 0 and state.rotation.error <= 1e-5
    assert 0.6 <= state.plan.achieved <= 0.7  # units of an eighth of the MACs each
    (node,) = nodes(state.model, "Attention")
    assert attr(node, "num_heads") == HEADS and attr(node, "scale") == pytest.approx(1 / np.sqrt(D))
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes)
    assert run_model(state.model, feeds)[0].shape == (1, SEQ, HIDDEN)


def test_attention_weight_is_a_consumer_layer_for_second_order_criteria(tmp_path):
    """The packed projection reads its input through a constant weight: the OBS criterion and
    the re-fit see it (and the data-free accurate pipeline prunes its head dimensions)."""
    from spa_compiler.calibrate import consumer_layers

    graph = token_graph(tmp_path, ATTENTION_BODY.format(extra="", mask=""),
                        {"Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=1), "Bqkv": weight(3 * HIDDEN, seed=2),
                         "Wo": weight(HIDDEN, HIDDEN, seed=3)})
    layers = {layer.weight: layer for layer in consumer_layers(analyze_graph(graph))}
    assert (layers["Wqkv"].axis, layers["Wqkv"].bias, layers["Wqkv"].channel_axis) == (0, "Bqkv", -1)
    result = prune_graph(graph, PruneConfig(ratio=0.5, round_to=1, criterion="obs", refit_rounds=1))
    assert result.plan.n_removed == D // 2  # head dimensions, the default where they rotate
    assert sorted(s.layer.weight for s in result.statistics.values()) == ["Wo", "Wqkv"]  # onnxruntime runs it


# -- MultiHeadAttention -----------------------------------------------------------------------

@pytest.mark.parametrize("attention_bias", [False, True], ids=["plain", "per_head_attention_bias"])
def test_multi_head_attention_prunes_whole_heads_exactly(tmp_path, attention_bias):
    body = f"""
        q = MatMul (x, Wq)
        k = MatMul (x, Wk)
        v = MatMul (x, Wv)
        ctx = com.microsoft.MultiHeadAttention <num_heads = 4> (q, k, v, Bqkv{", , Rel" if attention_bias else ""})
        y = MatMul (ctx, Wo)
    """
    consts = {f"W{n}": weight(HIDDEN, HIDDEN, seed=k) for k, n in enumerate("qkvo")}
    rel = weight(1, HEADS, SEQ, SEQ, seed=8) * 3  # a relative-position bias per head
    graph = token_graph(tmp_path, body, {**consts, "Bqkv": weight(3 * HIDDEN, seed=9), "Rel": rel})
    assert heads_groups(analyze_graph(graph)) == [(4, 4)]
    pruned = prune_exact(graph)[1]
    assert shapes_of(pruned, ["Wq", "Wk", "Wv", "Bqkv", "Wo"]) == {
        "Wq": (32, 16), "Wk": (32, 16), "Wv": (32, 16), "Bqkv": (48,), "Wo": (16, 32)}
    if attention_bias:
        assert initializer(pruned, "Rel").shape == (1, 2, SEQ, SEQ)
    assert attr(nodes(pruned, "MultiHeadAttention")[0], "num_heads") == 2


# -- GroupQueryAttention (4 query heads, 2 KV groups) and RotaryEmbedding ----------------------

GQA_SEPARATE = """
    q0 = MatMul (x, Wq)
    k0 = MatMul (x, Wk)
    v = MatMul (x, Wv)
    q = com.microsoft.RotaryEmbedding <num_heads = 4> (q0, Pos, Cos, Sin)
    k = com.microsoft.RotaryEmbedding <num_heads = 2> (k0, Pos, Cos, Sin)
    ctx, present_k, present_v = com.microsoft.GroupQueryAttention <num_heads = 4, kv_num_heads = 2> (q, k, v, {past}, Seqlens, Total)
    y = MatMul (ctx, Wo)
"""
GQA_PACKED = """
    qkv = MatMul (x, Wqkv)
    ctx, present_k, present_v = com.microsoft.GroupQueryAttention <num_heads = 4, kv_num_heads = 2> (qkv, , , {past}, Seqlens, Total)
    y = MatMul (ctx, Wo)
"""
PAST = 3
CACHE_IO = f"float[1,2,{PAST},{D}] past_k, float[1,2,{PAST},{D}] past_v"
PRESENT = f"float[1,2,{PAST + SEQ},{D}] present_k, float[1,2,{PAST + SEQ},{D}] present_v"


def _gqa_graph(tmp_path, body: str, cache: bool):
    past = "past_k, past_v" if cache else ","
    positions = PAST + SEQ if cache else SEQ
    consts = {
        "Wq": weight(HIDDEN, 32, seed=1), "Wk": weight(HIDDEN, 16, seed=2), "Wv": weight(HIDDEN, 16, seed=3),
        "Wqkv": weight(HIDDEN, 64, seed=4), "Wo": weight(HIDDEN, HIDDEN, seed=5),
        "Pos": np.arange(positions - SEQ, positions, dtype=np.int64)[None],
        "Cos": np.cos(np.outer(np.arange(16), 1e-1 ** np.arange(D // 2))).astype(np.float32),
        "Sin": np.sin(np.outer(np.arange(16), 1e-1 ** np.arange(D // 2))).astype(np.float32),
        "Seqlens": np.array([positions - 1], np.int32), "Total": np.array(positions, np.int32),
    }
    inputs, outputs = (f"{TOKENS}, {CACHE_IO}", f"{OUT}, {PRESENT}") if cache else (TOKENS, OUT)
    if not cache:
        body = body.replace("ctx, present_k, present_v", "ctx")
    return token_graph(tmp_path, body.format(past=past), consts, inputs, outputs)


@pytest.mark.parametrize("body", [GQA_SEPARATE, GQA_PACKED], ids=["separate_rotary", "packed"])
def test_group_query_attention_prunes_whole_kv_groups_exactly(tmp_path, body):
    graph = _gqa_graph(tmp_path, body, cache=False)
    assert heads_groups(analyze_graph(graph)) == [(2, 2)]
    pruned = prune_exact(graph)[1]
    gqa = nodes(pruned, "GroupQueryAttention")[0]
    assert (attr(gqa, "num_heads"), attr(gqa, "kv_num_heads")) == (2, 1)
    if body is GQA_SEPARATE:
        assert shapes_of(pruned, ["Wq", "Wk", "Wv", "Wo"]) == {"Wq": (32, 16), "Wk": (32, 8), "Wv": (32, 8), "Wo": (16, 32)}
        assert [attr(n, "num_heads") for n in nodes(pruned, "RotaryEmbedding")] == [2, 1]
    else:
        assert shapes_of(pruned, ["Wqkv", "Wo"]) == {"Wqkv": (32, 32), "Wo": (16, 32)}


def test_group_query_attention_with_a_kv_cache_prunes_query_heads_within_groups(tmp_path):
    """The cache is graph input and output: its shapes stay, so position t of every KV group
    leaves together and kv_num_heads stays 2."""
    graph = _gqa_graph(tmp_path, GQA_SEPARATE, cache=True)
    analysis = analyze_graph(graph)
    assert heads_groups(analysis) == [(2, 2), (2, 0)]  # query heads; the key heads, kept with the cache
    (heads,) = [g for g in analysis.groups if analysis.axis_id("Wq", 1) in g.axes]
    assert [unit.members[analysis.axis_id("Wq", 1)].tolist() for unit in heads.units] == [
        [*range(0, 8), *range(16, 24)], [*range(8, 16), *range(24, 32)]]
    pruned = prune_exact(graph)[1]
    gqa = nodes(pruned, "GroupQueryAttention")[0]
    assert (attr(gqa, "num_heads"), attr(gqa, "kv_num_heads")) == (2, 2)
    assert shapes_of(pruned, ["Wq", "Wk", "Wv", "Wo"]) == {"Wq": (32, 16), "Wk": (32, 16), "Wv": (32, 16), "Wo": (16, 32)}


def test_group_query_attention_cache_allowed_to_change_prunes_whole_kv_groups(tmp_path):
    """With --allow-io-change naming the cache, whole KV groups go again: the past and present
    lose the group's key/value head, and the pruned model runs on the narrower cache."""
    graph = _gqa_graph(tmp_path, GQA_SEPARATE, cache=True)
    config = PruneConfig(ratio=0.5, round_to=1, allow_io_change=("past_*", "present_*"))
    assert heads_groups(analyze_graph(graph, allow_io_change=config.allow_io_change)) == [(2, 2)]
    pruned = prune_graph(graph, config).model
    gqa = nodes(pruned, "GroupQueryAttention")[0]
    assert (attr(gqa, "num_heads"), attr(gqa, "kv_num_heads")) == (2, 1)
    feeds = synthetic_inputs({**graph.input_shapes, "past_k": (1, 1, PAST, D), "past_v": (1, 1, PAST, D)}, graph.dtypes)
    assert [o.shape for o in run_model(pruned, feeds)] == [(1, SEQ, HIDDEN), (1, 1, PAST + SEQ, D), (1, 1, PAST + SEQ, D)]


# -- normalisations: leading axes identity, hidden axis a barrier ------------------------------

NORM_CASES = [
    pytest.param("h = com.microsoft.SkipLayerNormalization (a, Sk, G, Bt, Bs)",
                 {"Sk": (1, 8, 8), "G": (8,), "Bt": (8,), "Bs": (8,)}, id="SkipLayerNormalization"),
    pytest.param("n, _m, _i, s = com.microsoft.SkipLayerNormalization (a, Sk, G, Bt)\nh = Add (n, s)",
                 {"Sk": (1, 8, 8), "G": (8,), "Bt": (8,)}, id="SkipLayerNormalization_sum_output"),
    pytest.param("h = com.microsoft.SkipSimplifiedLayerNormalization (a, Sk, G, Bs)",
                 {"Sk": (8, 8), "G": (8,), "Bs": (8,)}, id="SkipSimplifiedLayerNormalization_2d_skip"),
    pytest.param("h = SimplifiedLayerNormalization <axis = -1> (a, G)", {"G": (8,)}, id="SimplifiedLayerNormalization"),
]


@pytest.mark.parametrize("body, consts", NORM_CASES)
def test_fused_norm_passes_leading_channels_exactly(tmp_path, body, consts):
    """``Conv1d(3 -> 8) -> norm over the last (length) axis -> Conv1d(8 -> 4)``: the channels
    (a leading axis) pass through the norm and half of them go; a full-size skip is sliced."""
    text = f"""g (float[1,3,8] x) => (float[1,4,8] y) {{
        a = Conv <pads = [1, 1]> (x, W1, B1)
        {body}
        y = Conv (h, W2)
    }}"""
    graph = build(tmp_path, text, 17, {"W1": (8, 3, 3), "B1": (8,), **consts, "W2": (4, 8, 1)}, domains=MS)
    pruned = prune_exact(graph)[1]
    expect = {**consts, "W1": (4, 3, 3), "B1": (4,), "W2": (4, 4, 1)}
    if "Sk" in consts:
        expect["Sk"] = (*consts["Sk"][:-2], 4, 8)
    assert shapes_of(pruned, expect) == expect


SKIP_FFN = """
    a = MatMul (x, W1)
    h = com.microsoft.{gelu} (a{bias})
    f = MatMul (h, W2)
    n = com.microsoft.SkipLayerNormalization (f, x, G, Bt, B2)
    y = MatMul (n, W3)
"""


@pytest.mark.parametrize("gelu, bias", [("BiasGelu", ", B1"), ("FastGelu", ", B1"), ("FastGelu", "")])
def test_fused_gelu_prunes_ffn_neurons_and_the_residual_stays(tmp_path, gelu, bias):
    graph = token_graph(tmp_path, SKIP_FFN.format(gelu=gelu, bias=bias), {
        "W1": weight(HIDDEN, 64, seed=1), "B1": weight(64, seed=2), "W2": weight(64, HIDDEN, seed=3),
        "G": weight(HIDDEN, seed=4), "Bt": weight(HIDDEN, seed=5), "B2": weight(HIDDEN, seed=6),
        "W3": weight(HIDDEN, HIDDEN, seed=7)})
    analysis = analyze_graph(graph)
    hidden = [g for g in analysis.groups if len(g.units) == HIDDEN and analysis.axis_id("W2", 1) in g.axes]
    assert [len(g.prunable) for g in hidden] == [0]
    pruned = assert_exact(graph, CONFIG, rtol=RTOL)
    assert shapes_of(pruned, ["W1", "W2", "W3"]) == {"W1": (32, 32), "W2": (32, 32), "W3": (32, 32)}
    if bias:
        assert initializer(pruned, "B1").shape == (32,)


RESIDUAL_FFN = """
    r = MatMul (x, W0)
    a = MatMul (r, W1)
    h = com.microsoft.BiasGelu (a, B1)
    f = MatMul (h, W2)
    n = com.microsoft.SkipLayerNormalization (f, r, G, Bt, B2)
    y = MatMul (n, W3)
"""


def test_fused_ops_add_the_bias_of_the_layer_before_them(tmp_path):
    """The bias a fused op adds to a layer's output (BiasGelu's B, SkipLayerNormalization's bias)
    is that layer's bias for the second-order criterion, bias correction and the re-fit."""
    from spa_compiler.calibrate import consumer_layers

    graph = token_graph(tmp_path, SKIP_FFN.format(gelu="BiasGelu", bias=", B1"), {
        "W1": weight(HIDDEN, 64, seed=1), "B1": weight(64, seed=2), "W2": weight(64, HIDDEN, seed=3),
        "G": weight(HIDDEN, seed=4), "Bt": weight(HIDDEN, seed=5), "B2": weight(HIDDEN, seed=6),
        "W3": weight(HIDDEN, HIDDEN, seed=7)})
    assert {layer.weight: layer.bias for layer in consumer_layers(analyze_graph(graph))} == {
        "W1": "B1", "W2": "B2", "W3": None}


def test_prune_hidden_couples_skip_layer_normalization_lossily(tmp_path):
    """The residual stream ``r`` is a barrier at SkipLayerNormalization; with --prune-hidden it
    is one lossy "hidden" group through the skip, the input, gamma, beta and bias."""
    graph = token_graph(tmp_path, RESIDUAL_FFN, {
        "W0": weight(HIDDEN, HIDDEN, seed=0), "W1": weight(HIDDEN, 64, seed=1), "B1": weight(64, seed=2),
        "W2": weight(64, HIDDEN, seed=3), "G": weight(HIDDEN, seed=4), "Bt": weight(HIDDEN, seed=5),
        "B2": weight(HIDDEN, seed=6), "W3": weight(HIDDEN, HIDDEN, seed=7)})
    blocked = analyze_graph(graph)
    assert [len(g.prunable) for g in blocked.groups if blocked.axis_id("W0", 1) in g.axes] == [0]
    analysis = analyze_graph(graph, prune_hidden=True)
    (stream,) = [g for g in analysis.groups if analysis.axis_id("W0", 1) in g.axes]
    assert (analysis.kind(stream), len(stream.prunable)) == ("hidden", HIDDEN)
    assert {analysis.axis_id(n, 0) for n in ("G", "Bt", "B2", "W1", "W3")} <= set(stream.axes)
    result = prune_graph(graph, PruneConfig(ratio=0.5, round_to=1, prune_hidden=True))
    assert result.removed_by_axis[analysis.axis_id("G", 0)].size == 16


# -- EmbedLayerNormalization feeding Attention --------------------------------------------------

def test_embed_layer_normalization_feeds_attention_heads_exactly(tmp_path):
    body = """
        e, mask_index = com.microsoft.EmbedLayerNormalization (ids, segments, Word, Position, Segment, G, Bt, mask)
        ctx = com.microsoft.Attention <num_heads = 4> (e, Wqkv, Bqkv, mask_index)
        y = MatMul (ctx, Wo)
    """
    consts = {"Word": weight(50, HIDDEN, seed=1), "Position": weight(16, HIDDEN, seed=2),
              "Segment": weight(2, HIDDEN, seed=3), "G": weight(HIDDEN, seed=4), "Bt": weight(HIDDEN, seed=5),
              "Wqkv": weight(HIDDEN, 3 * HIDDEN, seed=6), "Bqkv": weight(3 * HIDDEN, seed=7),
              "Wo": weight(HIDDEN, HIDDEN, seed=8)}
    ids = f"int32[1,{SEQ}] ids, int32[1,{SEQ}] segments, int32[1,{SEQ}] mask"
    graph = token_graph(tmp_path, body, consts, inputs=ids)
    analysis = analyze_graph(graph)
    assert heads_groups(analysis) == [(4, 4)] and analysis.barriers == []
    data, note = synthetic_calibration(graph, 8)  # data-free token ids are rows of the word table
    assert "Zipf token ids in [1, 49] of a 50-row embedding" in note and data["ids"].min() >= 1
    pruned = assert_exact(graph, WHOLE_HEADS, rtol=RTOL)
    assert shapes_of(pruned, ["Word", "Wqkv", "Wo"]) == {"Word": (50, 32), "Wqkv": (32, 48), "Wo": (16, 32)}


# -- end to end: models after onnxruntime's transformer optimiser ------------------------------

def _fused_ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft")


def _units(analysis) -> list[tuple[int, int, str]]:
    return sorted((len(g.units), len(g.prunable), analysis.kind(g)) for g in analysis.groups if g.prunable)


@pytest.mark.real_model
def test_minilm_after_the_onnxruntime_optimiser_prunes_like_the_export(tmp_path):
    """all-MiniLM-L6-v2 exported, then fused by onnxruntime's optimiser: the same heads and FFN
    neurons are found, and at --flops 0.5 the fused model's embeddings of real sentences keep
    the export's fidelity within 0.01."""
    from models.fused_benchmark import optimize_for_onnxruntime
    from models.real import export_minilm, load_minilm

    seq = 32
    shapes = {name: (1, seq) for name in ENCODER_INPUTS}
    exported = export_minilm(tmp_path / "minilm.onnx", seq)
    fused = optimize_for_onnxruntime(exported, tmp_path / "minilm_ort.onnx", "bert", 12, 384)
    ops = _fused_ops(fused)
    assert ops == {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
    assert _units(analyze_graph(load_model(fused, shapes))) == [(12, 12, "heads")] * 6 + [(1536, 1536, "channels")] * 6
    inputs = tokenize(load_minilm()[0], SENTENCES, seq)
    reference = embed(exported, inputs)
    cosines = {}
    for name, model in (("exported", exported), ("fused", fused)):
        output = tmp_path / f"{name}_pruned.onnx"
        report = prune(model, output, PruneConfig(flops=0.5, input_shapes=shapes, bench_runs=0))
        assert 0.48 <= report.flops_ratio <= 0.52
        cosines[name] = mean_cosine(reference, embed(output, inputs))
    assert _fused_ops(tmp_path / "fused_pruned.onnx") == ops
    assert abs(cosines["fused"] - cosines["exported"]) <= 0.01, cosines


def test_gpt2_after_the_onnxruntime_optimiser(tmp_path):
    """A transformers GPT-2 (random weights) through the optimiser's gpt2 fusions
    (SkipLayerNormalization, FastGelu; attention stays plain ops): heads and FFN neurons of both
    layers prune to half the FLOPs, exactly when the removed ones are zeroed."""
    from models.fused_benchmark import export_gpt2, optimize_for_onnxruntime

    shapes = {"input_ids": (1, 16)}
    fused = optimize_for_onnxruntime(export_gpt2(tmp_path / "gpt2.onnx"), tmp_path / "gpt2_ort.onnx", "gpt2", 4, 64)
    assert _fused_ops(fused) == {"SkipLayerNormalization": 4, "FastGelu": 2}
    assert _units(analyze_graph(load_model(fused, shapes))) == [(4, 4, "heads")] * 2 + [(256, 256, "channels")] * 2
    report = prune(fused, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, input_shapes=shapes, bench_runs=0))
    assert 0.48 <= report.flops_ratio <= 0.52
    assert_exact(load_model(fused, shapes), PruneConfig(ratio=0.5, round_to=1, input_shapes=shapes), rtol=1e-4)
