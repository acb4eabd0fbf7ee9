"""--prune-hidden through LayerNorms written out as ops (ConvNeXt's channels-first LayerNorm, JAX/TF
exports' ReduceSum / N): lossy by design, and precisely so: the pruned model normalises the kept
channels with mean and variance taken over the kept channels only, which a numpy reference checks
to 1e-4. Statistics that belong to no LayerNorm stay barriers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from spa_compiler import PruneConfig, analyze_graph, prune_graph, synthetic_inputs
from spa_compiler.errors import TargetError
from spa_compiler.rewrite import rewrite_model
from spa_compiler.verify import run_model
from test_op_rules import build, f32, i64, removed

C, L, EPS = 8, 5, 1e-5

# x[1,6,5] -> a = A @ x [1,8,5] (channels on axis 1) -> normalised over axis 1 -> n -> y = W2 @ n
MEAN_SUB_POW = """
    m = ReduceMean <axes = [1]> (a)
    d = Sub (a, m)
    q = Pow (d, two)
    v = ReduceMean <axes = [1]> (q)"""
SUM_DIV = """
    s = ReduceSum (a, axes)
    m = Div (s, N)
    d = Sub (a, m)
    q = Mul (d, d)
    vs = ReduceSum (q, axes)
    v = Div (vs, N)"""
SUM_INVERSE_MOMENTS = """
    s = ReduceSum (a, axes)
    m = Mul (s, invN)
    sq = Mul (a, a)
    s2 = ReduceSum (sq, axes)
    m2 = Mul (s2, invN)
    mm = Mul (m, m)
    v = Sub (m2, mm)
    d = Sub (a, m)"""
NORMALISE = """
    ve = Add (v, eps)
    sd = Sqrt (ve)
    z = Div (d, sd)
    g = Mul (z, gamma)
    n = Add (g, beta)
    y = MatMul (W2, n)"""


def layernorm_model(tmp_path, statistics: str):
    text = f"""g (float[1,6,{L}] x) => (float[1,3,{L}] y) {{
    a = MatMul (A, x){statistics}{NORMALISE}
    }}"""
    consts = {"A": (C, 6), "W2": (3, C), "gamma": (C, 1), "beta": (C, 1), "two": f32(2.0), "eps": f32(EPS),
              "axes": i64(1), "N": f32(C), "invN": f32(1.0 / C)}
    used = {k: v for k, v in consts.items() if k in text or k in ("A", "W2")}
    return build(tmp_path, text, 13, used)


def reference(graph, kept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``W2[:, K] @ LayerNorm_K(A[K] @ x)``: the LayerNorm over the kept channels only."""
    k = graph.constants
    a = (k["A"] @ x[0])[kept]
    centred = a - a.mean(0, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(0, keepdims=True) + EPS)
    return (k["W2"][:, kept] @ (normed * k["gamma"][kept] + k["beta"][kept]))[None]


@pytest.mark.parametrize("statistics", [MEAN_SUB_POW, SUM_DIV, SUM_INVERSE_MOMENTS], ids=["mean_sub_pow", "sum_div", "moments_times_inverse"])
def test_written_out_layernorm_over_channels(tmp_path, statistics):
    graph = layernorm_model(tmp_path, statistics)
    assert sum(len(g.prunable) for g in analyze_graph(graph).groups) == 0  # a barrier unless asked
    analysis = analyze_graph(graph, prune_hidden=True)
    (group,) = [g for g in analysis.groups if g.prunable]
    assert (analysis.kind(group), len(group.units)) == ("hidden", C)
    result = prune_graph(graph, PruneConfig(ratio=0.5, round_to=1, prune_hidden=True, verify=False))
    gone = removed(result, "a", 1)
    assert len(gone) == C // 2
    pruned = rewrite_model(result.analysis, result.removed_by_axis)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed=2)
    (actual,) = run_model(pruned, feeds)
    expected = reference(graph, np.setdiff1d(np.arange(C), gone), feeds["x"])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_nothing_prunable_but_through_a_layernorm_names_prune_hidden(tmp_path):
    """The one error says what would prune the model (openWakeWord's wake-word heads are such)."""
    graph = layernorm_model(tmp_path, MEAN_SUB_POW)
    with pytest.raises(TargetError, match="nothing in this model can be pruned; blocked by: ReduceMean .*"
                                          "normalised over together \\(LayerNorm\\): --prune-hidden prunes them"):
        prune_graph(graph, PruneConfig(ratio=0.5, round_to=1))
    text = f"""g (float[1,6,{L}] x) => (float[1,{C},{L}] y) {{
    a = MatMul (A, x)
    y = Relu (a)
    }}"""
    with pytest.raises(TargetError, match="blocked by: graph output 'y'[^;]*$"):
        prune_graph(build(tmp_path, text, 13, {"A": (C, 6)}), PruneConfig(ratio=0.5, round_to=1))


def test_channel_mean_outside_a_layernorm_stays_a_barrier(tmp_path):
    """A mean over the channels used as a gate (not subtracted from them) is no LayerNorm."""
    text = f"""g (float[1,6,{L}] x) => (float[1,3,{L}] y) {{
    a = MatMul (A, x)
    m = ReduceMean <axes = [1]> (a)
    s = Sigmoid (m)
    n = Mul (a, s)
    y = MatMul (W2, n)
    }}"""
    graph = build(tmp_path, text, 13, {"A": (C, 6), "W2": (3, C)})
    analysis = analyze_graph(graph, prune_hidden=True)
    assert sum(len(g.prunable) for g in analysis.groups) == 0


@pytest.mark.parametrize("opset", [11, 17])
def test_convnext_stream_prunes_with_prune_hidden(exported, tmp_path, opset):
    """ConvNeXt's residual streams pass channels-first LayerNorms written out as ops (stem and
    downsampling) and channels-last ones (LayerNormalization at 17, written out at 11): blocked
    by default, pruned (lossy) with --prune-hidden, and the model stays valid."""
    from spa_compiler import load_model, prune

    source = exported("convnext_tiny", opset)
    streams = [g for g in analyze_graph(load_model(source)).groups if g.name.startswith(("Conv '/stem", "Conv '/down"))]
    assert [(len(g.units), len(g.prunable)) for g in streams] == [(32, 0), (64, 0)]
    analysis = analyze_graph(load_model(source), prune_hidden=True)
    hidden = [g for g in analysis.groups if analysis.kind(g) == "hidden"]
    assert [(g.name.split("'")[1], len(g.units), len(g.prunable)) for g in hidden] == [
        ("/stem/stem.0/Conv", 32, 32), ("/down/down.1/Conv", 64, 64)
    ]
    report = prune(source, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=8, prune_hidden=True, bench_runs=0))
    assert [(g.channels_before, g.channels_after) for g in report.groups if g.kind == "hidden"] == [(32, 16), (64, 32)]
    assert report.flops_ratio < 0.3
    onnx.checker.check_model(onnx.load(tmp_path / "p.onnx"), full_check=True)
