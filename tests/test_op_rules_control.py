"""Control flow: nodes inside If branches and Loop bodies prune like any other, couplings cross an
If's boundary (outer-scope tensors read by name, If outputs = branch outputs), a Loop's carried
values stay. Exactness as in test_op_rules: zero the readers, prune, outputs unchanged (1e-4),
with the condition sending the data through each branch in turn."""

from __future__ import annotations

import numpy as np
import pytest

import onnx

from spa_compiler import analyze_graph, load_model, prune_graph
from spa_compiler.cost import node_macs
from spa_compiler.subgraphs import walk_nodes
from spa_compiler.unshare import share_identical
from test_op_rules import CONFIG, build, f32, group_of, make_model, prune_exact, removed, shapes_of

# x -> Conv(W1) a (outer) -> If: then Relu -> Conv(W2); else Conv(W3) -> Relu -> Conv(W4) -> y
IF_MODEL = """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
    a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    m = ReduceMax <keepdims = 0> (x)
    c = {compare} (m, zero)
    y = If (c) <then_branch = then_g () => (float[1,4,8,8] t) {{
        r = Relu (a)
        t = Conv (r, W2)
    }}, else_branch = else_g () => (float[1,4,8,8] e) {{
        h = Conv <pads = [1, 1, 1, 1]> (a, W3)
        hr = Relu (h)
        e = Conv (hr, W4)
    }}>
}}"""
IF_CONSTS = {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "W3": (6, 8, 3, 3), "W4": (4, 6, 1, 1), "zero": f32(0.0)}


@pytest.mark.parametrize("compare", ["Greater", "Less"], ids=["then", "else"])
def test_if_branches_prune_exactly(tmp_path, compare):
    """The outer Conv's channels are read in both branches (one group through W2 and W3); the
    else branch's own Conv prunes inside it. Either branch taken, outputs are unchanged."""
    graph = build(tmp_path, IF_MODEL.format(compare=compare), 13, IF_CONSTS)
    analysis = analyze_graph(graph)
    assert group_of(analysis, "W1", 0) is group_of(analysis, "W2", 1) is group_of(analysis, "W3", 1)
    assert {g.name: len(g.prunable) for g in analysis.groups} == {
        "Conv 'Conv_0'": 8, "Conv 'If_3/else_branch/Conv_0'": 6, "Conv 'If_3/then_branch/Conv_1'": 0,
    }
    assert group_of(analysis, "W2", 0) is group_of(analysis, "W4", 0)  # both are the If's output y
    result, pruned = prune_exact(graph)
    assert len(removed(result, "a", 1)) == 4 and len(removed(result, "h", 1)) == 3
    branches = {n.name: n for n in walk_nodes(pruned.graph)}
    assert [tuple(d.dim_value for d in branches["If_3"].attribute[0].g.output[0].type.tensor_type.shape.dim)] == [(1, 4, 8, 8)]
    expect = {"W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1), "W3": (3, 4, 3, 3), "W4": (4, 3, 1, 1)}
    assert shapes_of(pruned, expect) == expect


def test_if_macs_count_both_branches(tmp_path):
    graph = build(tmp_path, IF_MODEL.format(compare="Greater"), 13, IF_CONSTS)
    macs = node_macs(analyze_graph(graph))
    assert macs == {"Conv_0": 64 * 8 * 27, "If_3/then_branch/Conv_1": 64 * 4 * 8, "If_3/else_branch/Conv_0": 64 * 6 * 72,
                    "If_3/else_branch/Conv_2": 64 * 4 * 6}


def test_if_output_couples_with_both_branches(tmp_path):
    """When the branches' outputs are channels produced inside them, the If output couples
    them: the same channels leave both branches and the consumer after the If."""
    text = """g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        m = ReduceMax <keepdims = 0> (x)
        c = Greater (m, zero)
        b = If (c) <then_branch = then_g () => (float[1,8,8,8] t) {
            t = Conv <pads = [1, 1, 1, 1]> (x, Wt)
        }, else_branch = else_g () => (float[1,8,8,8] e) {
            e = Conv <pads = [1, 1, 1, 1]> (x, We, Be)
        }>
        r = Relu (b)
        y = Conv (r, W2)
    }"""
    graph = build(tmp_path, text, 13, {"Wt": (8, 3, 3, 3), "We": (8, 3, 3, 3), "Be": (8,), "W2": (4, 8, 1, 1), "zero": f32(0.0)})
    analysis = analyze_graph(graph)
    assert group_of(analysis, "Wt", 0) is group_of(analysis, "We", 0) is group_of(analysis, "W2", 1)
    result, pruned = prune_exact(graph)
    assert removed(result, "Wt", 0).tolist() == removed(result, "We", 0).tolist() == removed(result, "b", 1).tolist()
    assert shapes_of(pruned, ["Wt", "We", "Be"]) == {"Wt": (4, 3, 3, 3), "We": (4, 3, 3, 3), "Be": (4,)}


LOOP_MODEL = """g (float[1,8,8,8] x) => (float[1,4,8,8] y) {
    l = Loop (trip, cond0, x) <body = body_g (int64 i, bool cin, float[1,8,8,8] carried) => (bool cout, float[1,8,8,8] next) {
        cout = Identity (cin)
        h = Conv <pads = [1, 1, 1, 1]> (carried, Wa)
        hr = Relu (h)
        next = Conv (hr, Wb)
    }>
    y = Conv (l, W2)
}"""


def test_loop_body_prunes_inside_carried_graph_input_stays(tmp_path):
    """The carried value starts as the graph input, so its channels stay (through the body's
    input and output and the final value), while the channels the body makes and consumes
    itself prune exactly."""
    consts = {"trip": np.asarray(2, dtype=np.int64), "cond0": np.asarray(True), "Wa": (16, 8, 3, 3), "Wb": (8, 16, 1, 1),
              "W2": (4, 8, 1, 1)}
    graph = build(tmp_path, LOOP_MODEL, 13, consts)
    analysis = analyze_graph(graph)
    assert {g.name: (len(g.units), len(g.prunable)) for g in analysis.groups} == {
        "Conv 'Loop_0/body/Conv_1'": (16, 16), "Conv 'Loop_0/body/Conv_3'": (8, 0), "Conv 'Conv_1'": (4, 0),
    }
    assert analysis.barriers == []
    assert group_of(analysis, "Wb", 0) is group_of(analysis, "W2", 1)  # next = carried = l
    result, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["Wa", "Wb", "W2"]) == {"Wa": (8, 8, 3, 3), "Wb": (8, 8, 1, 1), "W2": (4, 8, 1, 1)}


def test_repeated_names_across_branches_keep_the_if_a_barrier(tmp_path):
    """Two branches defining the same tensor name cannot be told apart by name: the If blocks."""
    text = IF_MODEL.format(compare="Greater").replace("hr = Relu (h)\n        e = Conv (hr, W4)", "r = Relu (h)\n        e = Conv (r, W4)")
    graph = build(tmp_path, text, 13, IF_CONSTS)
    analysis = analyze_graph(graph)
    assert [(b.op_type, b.reason) for b in analysis.barriers] == [
        ("If", "its subgraphs repeat names defined elsewhere, so they are not analysed")
    ]
    assert {g.name: len(g.prunable) for g in analysis.groups} == {"Conv 'Conv_0'": 0}


def test_report_says_what_stays_inside(tmp_path):
    """The report names each control-flow node, how many of its inner nodes were analysed and
    how many channels made inside stay (the Loop body's last Conv writes the carried value,
    which starts as the graph input)."""
    from spa_compiler import PruneConfig, prune
    from spa_compiler.subgraphs import control_flow_notes

    consts = {"trip": np.asarray(2, dtype=np.int64), "cond0": np.asarray(True), "Wa": (16, 8, 3, 3), "Wb": (8, 16, 1, 1),
              "W2": (4, 8, 1, 1)}
    graph = build(tmp_path, LOOP_MODEL, 13, consts)
    assert control_flow_notes(analyze_graph(graph)) == [
        "Loop node 'Loop_0': 4 inner nodes analysed with the graph; 8 of the 24 channels made inside stay "
        "(graph input 'x')"
    ]
    report = prune(tmp_path / "model.onnx", tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert report.control_flow == control_flow_notes(analyze_graph(graph))


def test_loop_carried_value_prunes_through_the_body(tmp_path):
    """A carried value made by a Conv before the Loop: the initial value, the body's input and
    output and the final value lose the same channels, and the scan output (the value of every
    iteration, stacked) with them."""
    text = """g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[2,1,4,8,8] z) {
        a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        l, s = Loop (trip, cond0, a) <body = body_g (int64 i, bool cin, float[1,8,8,8] carried) => (bool cout, float[1,8,8,8] next, float[1,8,8,8] each) {
            cout = Identity (cin)
            h = Conv <pads = [1, 1, 1, 1]> (carried, Wa)
            hr = Relu (h)
            next = Conv (hr, Wb, Bb)
            each = Relu (next)
        }>
        y = Conv (l, W2)
        z = Conv (s, W3)
    }"""
    text = text.replace("z = Conv (s, W3)", "r = Reshape (s, flat)\n        q = Conv (r, W3)\n        z = Reshape (q, back)")
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), "trip": np.asarray(2, dtype=np.int64), "cond0": np.asarray(True),
              "Wa": (16, 8, 3, 3), "Wb": (8, 16, 1, 1), "Bb": (8,), "W2": (4, 8, 1, 1), "W3": (4, 8, 1, 1),
              "flat": np.asarray([2, 8, 8, 8], dtype=np.int64), "back": np.asarray([2, 1, 4, 8, 8], dtype=np.int64)}
    graph = build(tmp_path, text, 13, consts)
    analysis = analyze_graph(graph)
    carried = group_of(analysis, "W1", 0)
    assert carried is group_of(analysis, "Wb", 0) is group_of(analysis, "W2", 1) is group_of(analysis, "W3", 1)
    assert (len(carried.units), len(carried.prunable)) == (8, 8)
    result, pruned = prune_exact(graph)
    gone = removed(result, "a", 1).tolist()
    assert len(gone) == 4 and removed(result, "next", 1).tolist() == removed(result, "s", 2).tolist() == gone
    body = {n.name: n for n in walk_nodes(pruned.graph)}["Loop_1"].attribute[0].g
    assert [tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in [body.input[2], *body.output[1:]]] == [(1, 4, 8, 8)] * 3
    assert shapes_of(pruned, ["W1", "Wa", "Wb", "Bb"]) == {"W1": (4, 3, 3, 3), "Wa": (8, 4, 3, 3), "Wb": (4, 8, 1, 1), "Bb": (4,)}


def test_scan_state_and_slices_prune(tmp_path):
    """Scan over the first axis: the features of the scanned input (made by a MatMul before it),
    the state (a running sum) and the stacked outputs lose the same elements, exactly."""
    text = """g (float[5,6] x) => (float[5,3] y) {
        a = MatMul (x, A)
        sfinal, ys = Scan (s0, a) <num_scan_inputs = 1, body = body_g (float[8] sin, float[8] at) => (float[8] sout, float[8] yt) {
            sout = Add (sin, at)
            yt = Tanh (sout)
        }>
        y = MatMul (ys, W2)
    }"""
    graph = build(tmp_path, text, 13, {"A": (6, 8), "s0": (8,), "W2": (8, 3)})
    analysis = analyze_graph(graph)
    group = group_of(analysis, "A", 1)
    assert group is group_of(analysis, "s0", 0) is group_of(analysis, "W2", 0)
    assert (len(group.units), len(group.prunable)) == (8, 8)
    result, pruned = prune_exact(graph)
    assert removed(result, "sfinal", 0).tolist() == removed(result, "ys", 1).tolist() == removed(result, "a", 1).tolist()
    assert shapes_of(pruned, ["A", "s0", "W2"]) == {"A": (6, 4), "s0": (4,), "W2": (4, 3)}


# Two readers of V through their own Transpose: folding computes Vᵀ once per reader, and the
# rewrite writes it once.
SHARED_FOLD_MODEL = """g (float[1,8] x) => (float[1,8] y) {
    h = MatMul (x, Wa)
    r = Relu (h)
    vt = Transpose (V)
    t = MatMul (r, vt)
    wt = Transpose (V)
    s = MatMul (r, wt)
    y = Sub (t, s)
}"""


def test_weights_folded_once_per_reader_are_written_once(tmp_path):
    prune_exact(build(tmp_path, SHARED_FOLD_MODEL, 13, {"Wa": (8, 16), "V": (8, 16)}))  # vt and wt randomised apart
    path = tmp_path / "model.onnx"
    onnx.save_model(make_model(SHARED_FOLD_MODEL, 13, {"Wa": (8, 16), "V": (8, 16)}), str(path))
    graph = load_model(path)
    assert {name: value.shape for name, value in graph.constants.items()} == {"Wa": (8, 16), "vt": (16, 8), "wt": (16, 8)}
    result = prune_graph(graph, CONFIG)
    assert len(removed(result, "h", 1)) == 8
    assert {t.name: tuple(t.dims) for t in result.model.graph.initializer} == {"Wa": (8, 8), "vt": (8, 8)}
    assert [n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"] == ["Wa", "vt", "vt"]


def test_share_identical_leaves_shadowed_names_and_outputs(tmp_path):
    """Equal matrices merge, except one a subgraph names again and one that is a graph output;
    vectors stay apart."""
    model = make_model("""g (float[2,2] x) => (float[2,2] y, float[2,2] O) {
        a = Add (x, P)
        b = Add (a, Q)
        c = ReduceSum <keepdims = 0> (x)
        k = Greater (c, zero)
        y = If (k) <then_branch = t () => (float[2] ty) {
            R = Identity (x)
            ty = Add (b, R)
        }, else_branch = e () => (float[2] ey) {
            ey = Add (b, R)
        }>
        z = Add (x, u)
        y2 = Add (z, v)
    }""", 13, {"P": np.eye(2, dtype=np.float32), "Q": np.eye(2, dtype=np.float32), "R": np.eye(2, dtype=np.float32),
               "O": np.eye(2, dtype=np.float32), "zero": f32(0.0), "u": f32(1, 2), "v": f32(1, 2)})
    assert share_identical(model) == 1
    assert [t.name for t in model.graph.initializer] == ["P", "R", "O", "zero", "u", "v"]
    assert [n.input[1] for n in model.graph.node[:2]] == ["P", "P"]
