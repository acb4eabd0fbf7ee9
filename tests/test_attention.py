"""Attention: heads found from the graph, pruned whole, with run-time Reshape targets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import assert_exact
from spa_compiler import PruneConfig, analyze_graph, load_model, prune_graph
from spa_compiler.allocate import Constraints, widest_axis
from spa_compiler.analysis import Group, Unit
from spa_compiler.verify import run_model

HEADS, HEAD_DIM, HIDDEN = 4, 8, 32

def attention_tail(merge_target: str) -> str:
    """Scores from q [B, H, L, D] and k [B, H, D, L], softmax, context from v, merged back by
    Reshape to ``merge_target`` and projected by Wo, Bo into y."""
    return f"""
        scores0 = MatMul (q, k)
        scores = Div (scores0, Scale)
        probs = Softmax <axis = -1> (scores)
        context0 = MatMul (probs, v)
        context1 = Transpose <perm = [0, 2, 1, 3]> (context0)
        context = Reshape (context1, {merge_target})
        o0 = MatMul (context, Wo)
        y = Add (o0, Bo)
"""


# x: [B, L, 32] with dynamic B and L; targets [B, L, 4, 8] and [B, L, 32] computed from Shape(x)
# as PyTorch writes x.view(x.size(0), x.size(1), heads, head_dim).
ATTENTION = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, L, {HIDDEN}] x) => (float[B, L, {HIDDEN}] y) {{
        s = Shape (x)
        b = Gather <axis = 0> (s, Zero)
        l = Gather <axis = 0> (s, One)
        bu = Unsqueeze (b, Axis0)
        lu = Unsqueeze (l, Axis0)
        split_target = Concat <axis = 0> (bu, lu, Heads, HeadDim)
        merge_target = Concat <axis = 0> (bu, lu, Hidden)
        q0 = MatMul (x, Wq)
        q1 = Add (q0, Bq)
        k0 = MatMul (x, Wk)
        k1 = Add (k0, Bk)
        v0 = MatMul (x, Wv)
        v1 = Add (v0, Bv)
        q2 = Reshape (q1, split_target)
        k2 = Reshape (k1, split_target)
        v2 = Reshape (v1, split_target)
        q = Transpose <perm = [0, 2, 1, 3]> (q2)
        k = Transpose <perm = [0, 2, 3, 1]> (k2)
        v = Transpose <perm = [0, 2, 1, 3]> (v2)
{attention_tail("merge_target")}    }}
"""


def _attention_model(path, seed=0):
    model = onnx.parser.parse_model(ATTENTION)
    rng = np.random.default_rng(seed)
    weights = {f"W{n}": rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN) for n in "qkvo"}
    weights.update({f"B{n}": rng.standard_normal(HIDDEN) * 0.1 for n in "qkvo"})
    weights["Scale"] = np.array(np.sqrt(HEAD_DIM))
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in weights.items())
    ints = {"Zero": np.array(0), "One": np.array(1), "Axis0": np.array([0]), "Heads": np.array([HEADS]),
            "HeadDim": np.array([HEAD_DIM]), "Hidden": np.array([HIDDEN])}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.int64), n) for n, v in ints.items())
    onnx.save(model, path)
    return path


def test_heads_are_units_across_q_k_v_and_output(tmp_path):
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), {"x": (1, 6, HIDDEN)})
    analysis = analyze_graph(graph)
    (heads,) = [g for g in analysis.groups if analysis.tagged(g, "heads")]
    assert (len(heads.units), len(heads.prunable)) == (HEADS, HEADS)
    for h, unit in enumerate(heads.units):
        for weight, axis in (("Wq", 1), ("Wk", 1), ("Wv", 1), ("Wo", 0), ("Bq", 0)):
            rows = unit.members[analysis.axis_id(weight, axis)]
            np.testing.assert_array_equal(rows, np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM))


def test_pruning_heads_is_exact_and_keeps_dynamic_shapes(tmp_path):
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), {"x": (1, 6, HIDDEN)})
    pruned = assert_exact(graph, PruneConfig(ratio=0.5, round_to=1), rtol=1e-5)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert initializers["Wq"].shape == (HIDDEN, HIDDEN // 2)
    assert initializers["Wo"].shape == (HIDDEN // 2, HIDDEN)
    assert initializers["Heads"].tolist() == [HEADS // 2]
    assert initializers["Hidden"].tolist() == [HIDDEN // 2]
    assert initializers["HeadDim"].tolist() == [HEAD_DIM]
    dims = [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["B", "L"]
    x = np.random.default_rng(3).standard_normal((3, 11, HIDDEN)).astype(np.float32)
    assert run_model(pruned, {"x": x})[0].shape == (3, 11, HIDDEN)


def test_flops_target_counts_heads_with_all_their_projections(tmp_path):
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), {"x": (1, 16, HIDDEN)})
    result = prune_graph(graph, PruneConfig(flops=0.5, round_to=1, min_keep=0.0))
    heads = next(g for g in result.analysis.groups if result.analysis.tagged(g, "heads"))
    assert len(result.plan.removed[heads.id]) == HEADS // 2
    assert result.plan.achieved == pytest.approx(0.5, abs=0.02)


def test_rounding_counts_the_channels_a_unit_spans(tmp_path):
    """--round-to counts channels of the widest axis, not units: a head of 8 channels is a whole
    step at round-to 8, a head dimension spans 4 channels (one per head), so 2 of them make 8."""
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), {"x": (1, 16, HIDDEN)})
    constraints = Constraints(round_to=8)
    (heads,) = [g for g in analyze_graph(graph).groups if g.prunable]
    dims = [g for g in analyze_graph(graph, head_dims=True).groups if g.prunable]
    assert widest_axis(heads) == (HIDDEN, HEAD_DIM) and constraints.step_for(heads) == 1
    assert {widest_axis(g) for g in dims} == {(HIDDEN, HEADS)} and {constraints.step_for(g) for g in dims} == {2}
    assert Constraints(round_to=16).step_for(Group(0, "g", [0], [Unit({0: np.array([k])}) for k in range(64)], "n")) == 16
    result = prune_graph(graph, PruneConfig(flops=0.75, round_to=8, min_keep=0.0, criterion="l2"))
    assert len(result.plan.removed[heads.id]) == 1 and result.plan.rounded_finer == {}  # 3 heads: the rule's own step
    assert result.plan.achieved == pytest.approx(0.75, abs=0.02)


def test_a_shape_value_used_elsewhere_keeps_the_heads(tmp_path):
    """If the target holding the head count also feeds something spa-prune does not follow,
    the heads must stay."""
    path = _attention_model(tmp_path / "attention.onnx")
    model = onnx.load(path)
    model.graph.node.append(onnx.helper.make_node("Add", ["split_target", "split_target"], ["odd"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("odd", onnx.TensorProto.INT64, [4]))
    onnx.save(model, path)
    analysis = analyze_graph(load_model(path, {"x": (1, 6, HIDDEN)}))
    heads = [g for g in analysis.groups if analysis.tagged(g, "heads")]
    assert [(len(g.units), len(g.prunable)) for g in heads] == [(HEADS, 0)]
    projections = heads
    assert all("'Heads' sizing axis 2 is also used elsewhere" in g.blocked_reasons[0] for g in projections)


def test_head_dims_are_units_when_asked(tmp_path):
    """--head-dims: the units are position d of every head; the head count stays, the
    run-time head-dim constant is rewritten."""
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), {"x": (1, 6, HIDDEN)})
    analysis = analyze_graph(graph, head_dims=True)
    query_key, value_output = sorted((g for g in analysis.groups if analysis.kind(g) == "head dims"),
                                     key=lambda g: analysis.axis_id("Wq", 1) not in g.units[0].members)
    for dims, weights in ((query_key, ("Wq", "Wk")), (value_output, ("Wv",))):
        assert (len(dims.units), len(dims.prunable)) == (HEAD_DIM, HEAD_DIM)
        for name in weights:  # position 3 of every head
            np.testing.assert_array_equal(dims.units[3].members[analysis.axis_id(name, 1)],
                                          np.arange(HEADS) * HEAD_DIM + 3)
    # Q·Kᵀ reads head dims through no weight: zero Q's odd dims so that removing them is exact
    odd = (np.arange(HEADS)[:, None] * HEAD_DIM + np.arange(1, HEAD_DIM, 2)).ravel()
    for name in ("Wq", "Bq"):
        value = graph.constants[name].copy()
        value[..., odd] = 0
        graph.set_constant(name, value)
    pruned = assert_exact(graph, PruneConfig(ratio=0.5, round_to=1, head_dims=True, criterion="l2"), rtol=1e-5)
    assert initializer_shape(pruned, "Wq") == initializer_shape(pruned, "Wv") == (HIDDEN, HIDDEN // 2)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert initializers["Heads"].tolist() == [HEADS]
    # the targets of q, k and v are one Concat in the file; each Reshape got its own copy
    assert [initializers[n].tolist() for n in ("HeadDim", "HeadDim.1", "HeadDim.2")] == [[HEAD_DIM // 2]] * 3
    assert initializers["Hidden"].tolist() == [HIDDEN // 2]
    x = np.random.default_rng(5).standard_normal((2, 7, HIDDEN)).astype(np.float32)
    assert run_model(pruned, {"x": x})[0].shape == (2, 7, HIDDEN)


def initializer_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    return next(tuple(t.dims) for t in model.graph.initializer if t.name == name)
