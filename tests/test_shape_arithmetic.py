"""Exactness of the patterns whose sizes PyTorch computes at run time or regroups (issue 7):
GroupNorm decomposed into ``Reshape [0, G, -1] -> InstanceNormalization -> Reshape``, chunks whose
Slice bounds are ``Shape -> Gather -> Add -> Div -> Mul``, and a channel shuffle whose target
holds ``c // 2``. The models take a dynamic ``float[N,3,H,W]`` input and hide the channel count
behind a ``Reshape`` to ``[n, -1, h, w]``, as exports with dynamic sizes do, so the arithmetic
stays in the graph; they are loaded at ``1x3x8x8``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import randomize_weights
from spa_compiler import analyze_graph, load_model
from spa_compiler.shape_values import Const, Dim, Expr, evaluate
from spa_compiler.ops.runtime_shapes import chunk_length, follows_pruning
from test_op_rules import (
    build, chain, group_of, i64, input_value, make_model, nodes, prune_exact, removed, shapes_of,
)

X = "float[N,3,H,W] x"
# a[1,8,8,8] from the producer conv, then r = a with its channel count hidden from the exporter
HIDE_CHANNELS = """
    a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    sa = Shape (a)
    n = Gather <axis = 0> (sa, I0)
    h = Gather <axis = 0> (sa, I2)
    w = Gather <axis = 0> (sa, I3)
    un = Unsqueeze (n, Z)
    uh = Unsqueeze (h, Z)
    uw = Unsqueeze (w, Z)
    t0 = Concat <axis = 0> (un, M1, uh, uw)
    r = Reshape (a, t0)
    sr = Shape (r)
    c = Gather <axis = 0> (sr, I1)
"""
BASE = {"W1": (8, 3, 3, 3), "B1": (8,), "I0": np.asarray(0), "I1": np.asarray(1), "I2": np.asarray(2),
        "I3": np.asarray(3), "Z": i64(0), "M1": i64(-1), "ONE": np.asarray(1), "TWO": np.asarray(2)}


def load_dynamic(tmp_path, body: str, out: str, consts: dict, opset: int = 13):
    text = f"g ({X}) => ({out}) {{\n{HIDE_CHANNELS}\n{body}\n}}"
    path = tmp_path / "model.onnx"
    onnx.save_model(make_model(text, opset, {**BASE, **consts}), str(path))
    return randomize_weights(load_model(path, {"x": (1, 3, 8, 8)}))


CHUNK = """
    c1 = Add (c, ONE)
    half = Div (c1, TWO)
    e1 = Mul (half, ONE)
    e2 = Mul (half, TWO)
    ue1 = Unsqueeze (e1, Z)
    ue2 = Unsqueeze (e2, Z)
    s1 = Slice (r, Z, ue1, AX)
    s2 = Slice (r, ue1, ue2, AX)
    b = Conv (s2, Wb)
    cat = Concat <axis = 1> (s1, b)
    y = Conv (cat, W2)
"""


def test_chunk_with_run_time_bounds(tmp_path):
    """torch.chunk(2) of 8 channels at run-time bounds ``(c + 1) // 2``: position i of both halves
    leaves together, the bounds follow by themselves, and the branch conv prunes apart."""
    graph = load_dynamic(tmp_path, CHUNK, "float[N,4,H,W] y", {"AX": i64(1), "Wb": (4, 4, 1, 1), "W2": (4, 8, 1, 1)})
    assert [n.op_type for n in graph.nodes].count("Div") == 1  # the arithmetic is still there
    result, pruned = prune_exact(graph)
    assert result.analysis.barriers == []
    w1 = result.analysis.axis_id("W1", 0)
    assert all(len(u.members[w1]) == 2 for u in group_of(result.analysis, "W1", 0).units if w1 in u.members)
    gone = removed(result, "W1", 0)
    np.testing.assert_array_equal(gone, np.concatenate([gone[gone < 4], gone[gone < 4] + 4]))
    pairs = len(gone) // 2  # the group's 8 units: 4 position pairs of the stem and the branch's 4 filters
    assert pairs >= 1
    assert shapes_of(pruned, ["W1", "Wb"]) == {"W1": (8 - 2 * pairs, 3, 3, 3), "Wb": (pairs, 4 - pairs, 1, 1)}


SHUFFLE = """
    g2 = Div (c, TWO)
    ug2 = Unsqueeze (g2, Z)
    t1 = Concat <axis = 0> (un, G, ug2, uh, uw)
    r1 = Reshape (r, t1)
    tr = Transpose <perm = [0, 2, 1, 3, 4]> (r1)
    sb = Shape (r)
    r2 = Reshape (tr, sb)
    y = Conv (r2, W2)
"""


def test_channel_shuffle_with_run_time_target(tmp_path):
    """The shuffle target ``[n, 2, c // 2, h, w]``: the Div entry follows pruning (both groups lose
    the same positions), so the shuffle prunes exactly with no rewriting of its targets."""
    graph = load_dynamic(tmp_path, SHUFFLE, "float[N,4,H,W] y", {"G": i64(2), "W2": (4, 8, 1, 1)})
    result, pruned = prune_exact(graph)
    assert result.analysis.barriers == []
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (4, 4)
    gone = removed(result, "W1", 0)
    positions = gone[gone < 4]
    np.testing.assert_array_equal(gone, np.concatenate([positions, positions + 4]))
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}


def test_expand_of_a_relaid_out_tensor_to_its_own_run_time_size(tmp_path):
    """A meshgrid's ``v.view(-1, 1).expand(len(v), k)`` over channel means: the Expand target's
    first entry is the channel count read from ``v`` itself, so the expanded rows are the channels,
    position for position (YOLOv8's anchor grid; this used to fail reshaping 8 indices to 8x5)."""
    body = """
        p = ReduceMean <axes = [2, 3], keepdims = 0> (r)
        pv = Transpose <perm = [1, 0]> (p)
        sp = Shape (p)
        cp = Gather <axis = 0> (sp, I1)
        ucp = Unsqueeze (cp, Z)
        te = Concat <axis = 0> (ucp, FIVE)
        e = Expand (pv, te)
        et = Transpose <perm = [1, 0]> (e)
        y = MatMul (et, W2)
    """
    graph = load_dynamic(tmp_path, body, "float[5,4] y", {"FIVE": i64(5), "W2": (8, 4)})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert group is group_of(result.analysis, "W2", 0) and len(group.prunable) == 8
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 4)}


def test_slice_bounds_not_a_chunk_keep_the_channels(tmp_path):
    """The last three channels ``r[:, c - 3:]`` are no chunk: ``c - 3`` would move when channels
    leave, so the channels whose count it reads are never pruned."""
    body = """
        st = Sub (c, THREE)
        ust = Unsqueeze (st, Z)
        s = Slice (r, ust, END, AX)
        y = Conv (s, W2)
    """
    graph = load_dynamic(tmp_path, body, "float[N,4,H,W] y",
                         {"THREE": np.asarray(3), "END": i64(1 << 62), "AX": i64(1), "W2": (4, 3, 1, 1)})
    analysis = analyze_graph(graph)
    group = group_of(analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 0)
    assert any("reads the size of this axis" in r for r in group.blocked_reasons)


def test_run_time_target_partly_unknown_blocks_the_axes_it_reads(tmp_path):
    """A target ``[n, c, Size(r) // (n * c)]``: Size is not followed, so the target cannot be
    rewritten; the channels whose count ``c`` it reads keep their size, and the reason names the
    Shape node whose channel count goes where it cannot be followed (``Shape(r)``, not
    ``Shape(a)``, whose batch size alone goes there)."""
    body = """
        sz = Size (r)
        nc = Mul (n, c)
        k = Div (sz, nc)
        uc = Unsqueeze (c, Z)
        uk = Unsqueeze (k, Z)
        t = Concat <axis = 0> (un, uc, uk)
        y = Reshape (r, t)
    """
    graph = load_dynamic(tmp_path, body, "float[N,8,64] y", {})
    analysis = analyze_graph(graph)
    group = group_of(analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 0)
    assert group.blocked_reasons == ["Shape node 'Shape_10': its size is used in a way spa-prune cannot follow"]


SCALED_BY_A_SIZE = """
    sr2 = Shape (r)
    size = Gather <axis = 0> (sr2, {index})
    sizef = Cast <to = 1> (size)
    root = Sqrt (sizef)
    d = Div (r, root)
    y = Conv (d, W2)
"""


def test_a_size_read_by_arithmetic_keeps_only_its_own_axis(tmp_path):
    """``r / sqrt(r.size(2))`` (DeBERTa scales its scores by ``sqrt(q.size(-1))``): Sqrt is not
    followed, so the height must keep its size, but the channels may leave, exactly; scaled by
    ``sqrt(r.size(1))`` instead, the channels keep theirs."""
    consts = {"W2": (4, 8, 1, 1)}
    graph = load_dynamic(tmp_path, SCALED_BY_A_SIZE.format(index="I2"), "float[N,4,H,W] y", consts)
    result, pruned = prune_exact(graph)
    assert len(removed(result, "W1", 0)) == 4
    assert shapes_of(pruned, ["W2"]) == {"W2": (4, 4, 1, 1)}
    graph = load_dynamic(tmp_path, SCALED_BY_A_SIZE.format(index="I1"), "float[N,4,H,W] y", consts)
    group = group_of(analyze_graph(graph), "W1", 0)
    assert len(group.prunable) == 0
    assert any("its size is used in a way spa-prune cannot follow" in r for r in group.blocked_reasons)


def test_groupnorm_decomposed(tmp_path):
    """GroupNorm as exported at opset <= 17: 8 channels in 4 groups; whole groups leave, the
    InstanceNormalization parameters lose the groups and the first target's G becomes 2."""
    body = """
        g = Reshape (a, T1)
        nrm = InstanceNormalization <epsilon = 0.001> (g, S, Bn)
        sa = Shape (a)
        back = Reshape (nrm, sa)
        m = Mul (back, Gamma)
        h = Add (m, Beta)
        y = Conv (h, W2)
    """
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), "T1": i64(0, 4, -1), "S": (4,), "Bn": (4,),
              "Gamma": (8, 1, 1), "Beta": (8, 1, 1), "W2": (4, 8, 1, 1)}
    graph = build(tmp_path, chain(body, "float[1,4,8,8] y"), 13, consts)
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (4, 4)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4 and np.all(gone[0::2] % 2 == 0) and np.all(gone[1::2] == gone[0::2] + 1)
    assert shapes_of(pruned, ["S", "Bn", "Gamma", "W1", "W2"]) == {
        "S": (2,), "Bn": (2,), "Gamma": (4, 1, 1), "W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}
    assert list(input_value(pruned, nodes(pruned, "Reshape")[0], 1)) == [0, 2, -1]


HALF = Expr("Div", Expr("Add", Dim("x", 1), Const(1, "one", 0)), Const(2, "two", 0))


@pytest.mark.parametrize("start, end, size, length", [
    (Const(0, "zero", 0), HALF, 64, 32),                         # first half of chunk(2)
    (HALF, Expr("Mul", HALF, Const(2, "two", 0)), 64, 32),       # second half
    (HALF, Expr("Mul", HALF, Const(2, "two", 0)), 63, None),     # odd: halves of 32 and 31
    (Const(0, "zero", 0), Const(16, "c", 0), 64, None),          # constant bounds do not follow
    (Expr("Sub", Dim("x", 1), Const(3, "c", 0)), Const(1 << 62, "end", 0), 8, None),
])
def test_chunk_length(start, end, size, length):
    assert chunk_length(start, end, size) == length


def test_arithmetic_truncates_like_onnx_division():
    assert evaluate(Expr("Div", Const(-7, "a", 0), Const(2, "b", 0)), lambda d: 0) == -3
    assert evaluate(Expr("Div", Dim("x", 1), Const(0, "b", 0)), lambda d: 8) is None
    assert follows_pruning(Expr("Div", Dim("x", 1), Const(2, "two", 0)), 64, 32)
    assert not follows_pruning(Expr("Sub", Dim("x", 1), Const(2, "two", 0)), 64, 32)
