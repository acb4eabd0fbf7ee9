"""Exactness of the recurrent rules (RNN, GRU, LSTM): hidden units leave with every gate's rows
of W, R, B, P and the initial states, in every direction; the input features leave with W's
columns. Models: ``x -> MatMul (producer of the input features) -> recurrent -> [Transpose ->
Reshape, merging directions and hidden units] -> MatMul -> y``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import randomize_weights
from spa_compiler import PruneConfig, analyze_graph, load_model, prune_graph
from test_op_rules import CONFIG, attr, build, initializer, make_model, nodes, prune_exact, removed, shapes_of

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
T, IN, FEAT, H, OUT = 5, 6, 8, 8, 4


def recurrent_model(op: str, direction: str, states: bool = True, peepholes: bool = False):
    """Text and constants of a model around one recurrent node with hidden size 8."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    state_inputs = ", h0" + (", c0" if op == "LSTM" else "") if states else ""
    extra = ", P" if peepholes else ""
    outputs = "Y, Yh" + (", Yc" if op == "LSTM" else "")
    state_shape = (dirs, 1, H)
    skipped = ", " if states or peepholes else ""  # sequence_lens (and initial states) absent
    text = f"""g (float[{T},1,{IN}] x) => (float[{T},1,{OUT}] y) {{
        a = MatMul (x, Wx)
        {outputs} = {op} <hidden_size = {H}, direction = "{direction}"> (a, W, R, B{skipped}{state_inputs}{extra})
        t = Transpose <perm = [0, 2, 1, 3]> (Y)
        m = Reshape (t, shape)
        y = MatMul (m, Wo)
    }}"""
    consts = {
        "Wx": (IN, FEAT), "W": (dirs, gates * H, FEAT), "R": (dirs, gates * H, H), "B": (dirs, 2 * gates * H),
        "shape": np.asarray([T, 1, dirs * H], dtype=np.int64), "Wo": (dirs * H, OUT),
    }
    if states:
        consts["h0"] = state_shape
        if op == "LSTM":
            consts["c0"] = state_shape
    if peepholes:
        consts["P"] = (dirs, 3 * H)
    return text, consts


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_exact(tmp_path, op, direction):
    text, consts = recurrent_model(op, direction)
    graph = build(tmp_path, text, 14, consts)
    result, pruned = prune_exact(graph)
    gates, dirs = GATES[op], 2 if direction == "bidirectional" else 1
    hidden = removed(result, "Y", 3)
    assert len(hidden) == H // 2
    # every gate's rows of the same units, in every direction (one slab of axis 1)
    assert removed(result, "W", 1).tolist() == sorted(g * H + j for g in range(gates) for j in hidden)
    assert removed(result, "B", 1).tolist() == sorted(g * H + j for g in range(2 * gates) for j in hidden)
    assert len(removed(result, "W", 2)) == FEAT // 2  # the input side, with the producer MatMul
    expect = {"W": (dirs, gates * 4, 4), "R": (dirs, gates * 4, 4), "B": (dirs, 2 * gates * 4),
              "h0": (dirs, 1, 4), "Wx": (IN, 4)}
    assert shapes_of(pruned, expect) == expect
    assert attr(nodes(pruned, op)[0], "hidden_size") == 4


def test_lstm_peepholes(tmp_path):
    """Peepholes P [dirs, 3H] are sliced per gate."""
    text, consts = recurrent_model("LSTM", "bidirectional", peepholes=True)
    graph = build(tmp_path, text, 14, consts)
    result, pruned = prune_exact(graph)
    hidden = removed(result, "Y", 3)
    assert removed(result, "P", 1).tolist() == sorted(g * H + j for g in range(3) for j in hidden)
    assert shapes_of(pruned, ["P", "c0"]) == {"P": (2, 12), "c0": (2, 1, 4)}


def test_batch_first_layout_is_a_barrier(tmp_path):
    """onnxruntime does not run layout = 1: such a node blocks, nothing is guessed."""
    text, consts = recurrent_model("GRU", "forward", states=False)
    graph = build(tmp_path, text.replace('direction = "forward"', 'direction = "forward", layout = 1'), 14, consts)
    analysis = analyze_graph(graph)
    assert [(b.op_type, b.reason) for b in analysis.barriers] == [("GRU", "batch-first layout (layout = 1) is not supported")]
    assert sum(len(g.prunable) for g in analysis.groups) == 0


def test_recurrent_outputs_are_graph_outputs(tmp_path):
    """Y_h is a graph output: the hidden units stay; the input side still prunes."""
    text, consts = recurrent_model("GRU", "forward", states=False)
    text = text.replace(f"=> (float[{T},1,{OUT}] y)", f"=> (float[{T},1,{OUT}] y, float[1,1,{H}] Yh)")
    graph = build(tmp_path, text, 14, consts)
    analysis = analyze_graph(graph)
    prunable = {g.name: len(g.prunable) for g in analysis.groups}
    assert prunable == {"MatMul 'MatMul_0'": FEAT, "GRU 'GRU_1'": 0, "MatMul 'MatMul_4'": 0}
    result = prune_graph(graph, CONFIG)
    assert len(removed(result, "W", 2)) == FEAT // 2 and len(removed(result, "W", 1)) == 0


def test_recurrent_macs(tmp_path):
    """MACs of a recurrent node: seq * dirs * batch * G*H * (input + H), recounted as units go."""
    from spa_compiler.cost import node_macs

    text, consts = recurrent_model("LSTM", "bidirectional")
    graph = build(tmp_path, text, 14, consts)
    macs = node_macs(analyze_graph(graph))
    assert macs["LSTM_1"] == T * 2 * 1 * 4 * H * (FEAT + H)
    report = prune_graph(graph, PruneConfig(ratio=0.5, round_to=1, verify=False))
    assert report.plan.achieved < 0.5




def test_states_made_by_constant_of_shape(tmp_path):
    """Initial states made by ConstantOfShape of a shape computed at run time, as PyTorch exports
    ``zeros(dirs, batch, hidden)`` with a free batch axis (``Concat([dirs], Shape(x)[1],
    [hidden])``; loaded at batch 1; a value of 0.5 here, so a wrong state would show): the
    hidden units leave with the states' last axis, and the constant entry sizing it is rewritten."""
    text, consts = recurrent_model("LSTM", "bidirectional", states=False)
    states = """s = Shape (a)
        b = Gather <axis = 0> (s, one)
        hs = Concat <axis = 0> (dirs, b, hidden)
        h0 = ConstantOfShape <value = float[1] {0.5}> (hs)
        c0 = ConstantOfShape <value = float[1] {0.5}> (hs)
        Y, Yh"""
    text = text.replace("Y, Yh", states, 1).replace("(a, W, R, B)", "(a, W, R, B, , h0, c0)")
    text = text.replace(f"float[{T},1,", f"float[{T},N,")
    consts |= {"one": np.asarray([1], dtype=np.int64), "dirs": np.asarray([2], dtype=np.int64),
               "hidden": np.asarray([H], dtype=np.int64), "shape": np.asarray([T, -1, 2 * H], dtype=np.int64)}
    path = tmp_path / "model.onnx"
    onnx.save_model(make_model(text, 14, consts), str(path))
    graph = randomize_weights(load_model(path, {"x": (T, 1, IN)}))
    assert [n.op_type for n in graph.nodes].count("ConstantOfShape") == 2
    result, pruned = prune_exact(graph)
    assert len(removed(result, "Y", 3)) == H // 2
    assert removed(result, "h0", 2).tolist() == removed(result, "Y", 3).tolist()
    assert initializer(pruned, "hidden").tolist() == [H // 2] and initializer(pruned, "dirs").tolist() == [2]


@pytest.mark.parametrize("fill", ["ConstantOfShape (hs)", "Expand (value, hs)"], ids=["constant_of_shape", "expand"])
def test_stacked_layers_slice_one_fill(tmp_path, fill):
    """Two stacked GRUs take their states from one tensor of ``[2, batch, H]`` zeros, sliced per
    layer, as PyTorch exports ``nn.GRU(num_layers=2)``: a ``ConstantOfShape`` (the classic
    exporter) or an ``Expand`` of a constant 0 (the dynamo exporter). Each layer gets its own
    copy on loading, so each is a group of its own whose width the allocation chooses; exact."""
    text = f"""g (float[{T},N,{IN}] x) => (float[{T},N,{OUT}] y) {{
        a = MatMul (x, Wx)
        s = Shape (a)
        b = Gather <axis = 0> (s, one)
        hs = Concat <axis = 0> (layers, b, hidden)
        zeros = {fill}
        h0 = Slice (zeros, zero, one, zero)
        h1 = Slice (zeros, one, layers, zero)
        Y0, Yh0 = GRU <hidden_size = {H}> (a, W0, R0, B0, , h0)
        m0 = Squeeze (Y0, one)
        Y1, Yh1 = GRU <hidden_size = {H}> (m0, W1, R1, B1, , h1)
        t = Squeeze (Y1, one)
        y = MatMul (t, Wo)
    }}"""
    i64 = lambda v: np.asarray([v], dtype=np.int64)  # noqa: E731
    consts = {"Wx": (IN, FEAT), "W0": (1, 3 * H, FEAT), "R0": (1, 3 * H, H), "B0": (1, 6 * H),
              "W1": (1, 3 * H, H), "R1": (1, 3 * H, H), "B1": (1, 6 * H), "Wo": (H, OUT),
              "zero": i64(0), "one": i64(1), "layers": i64(2), "hidden": i64(H)}
    if fill.startswith("Expand"):
        consts["value"] = np.zeros(1, dtype=np.float32)
    path = tmp_path / "model.onnx"
    onnx.save_model(make_model(text, 14, consts), str(path))
    graph = randomize_weights(load_model(path, {"x": (T, 1, IN)}))
    assert [n.op_type for n in graph.nodes].count(fill.split()[0]) == 2
    assert {g.name for g in analyze_graph(graph).groups if g.prunable} == {
        "MatMul 'MatMul_0'", "GRU 'GRU_9'", "GRU 'GRU_11'"}
    result, pruned = prune_exact(graph)
    assert len(removed(result, "Y0", 3)) == len(removed(result, "Y1", 3)) == H // 2
    hidden = sorted(initializer(pruned, name).tolist()[0] for name in ("hidden", "hidden.1"))
    assert hidden == [H // 2, H // 2]
