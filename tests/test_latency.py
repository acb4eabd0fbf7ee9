"""The ``latency`` target: per-node profiles attributed to the original graph, terms that add up to
the measured latency, the profile cache, the pass that times its result, and the CLI option.

Timings on a shared machine are noisy: these tests assert structure and generous tolerances, never
a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa_compiler.latency as latency
from spa_compiler import (
    Constraints, CostModel, Pipeline, PruneConfig, PruneState, TargetError, analyze_graph, default_passes,
    get_criterion, load_model,
)
from spa_compiler.allocate import unit_counts
from spa_compiler.cost import get_metric
from spa_compiler.latency import AllocateLatency, Curve, Latency, LatencyProfile
from spa_compiler.profiling import attribute_kernel
from spa_compiler.stages import Analyse, Rewrite, Score, Verify
from test_cli import FAST_CLI

from helpers import EXAMPLE


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One profile cache for the module, so each width set is profiled once."""
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture
def env_cache(cache, monkeypatch) -> Path:
    monkeypatch.setenv("SPA_PRUNE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def analysis():
    return analyze_graph(load_model(EXAMPLE))


def conv_relu_pool(path: Path) -> Path:
    """x -> Conv -> Relu -> MaxPool -> Conv -> y, saved to ``path``."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2"], ["y"], name="conv2"),
    ]
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("W1", (16, 3, 3, 3)), ("W2", (4, 16, 1, 1)))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_fused_kernels_are_charged_to_their_compute_node(tmp_path):
    graph = load_model(conv_relu_pool(tmp_path / "m.onnx"))
    compute = {"conv1", "conv2"}
    assert attribute_kernel(graph, compute, "r1_nchwc", "Conv") == "conv1"  # Conv+Relu named after its output
    assert attribute_kernel(graph, compute, "conv2", "Conv") == "conv2"
    assert attribute_kernel(graph, compute, "p1_nchwc", "MaxPool") == "pool1"  # its own time
    assert attribute_kernel(graph, compute, "relu1", "Relu") == "relu1"
    assert attribute_kernel(graph, compute, "ReorderOutput", "ReorderOutput") is None


def test_curve_interpolates_monotonically_and_extrapolates_to_no_less_than_zero():
    curve = Curve(100.0, np.array([1.0, 0.5, 0.5, 0.25]), np.array([4.0, 2.5, 1.5, 1.2]))
    assert curve([100]) == pytest.approx(4.0)
    assert curve([50]) == pytest.approx(2.0)  # the two points at 0.5 averaged
    assert curve([75]) == pytest.approx(3.0)
    assert curve([10]) == pytest.approx(1.2 - 3.2 * 0.15)  # along the first segment, slope (2 - 1.2) / 0.25
    assert Curve(1.0, np.array([1.0, 0.5]), np.array([1.0, 0.1]))([0.0]) == 0.0
    noisy = Curve(1.0, np.array([1.0, 0.6, 0.3]), np.array([1.0, 1.2, 0.2]))  # 0.6 measured slower than 1.0
    assert noisy([0.6]) <= noisy([1.0]) and noisy([0.3]) <= noisy([0.6])


def test_the_constant_part_of_the_unaccounted_latency_is_the_intercept():
    kernels = {"a": [6.0, 3.0, 1.0], "b": [4.0, 2.0, None]}  # charged: 10, 5, 1
    profile = LatencyProfile([1.0, 0.5, 0.1], [13.0, 7.0, 2.2], kernels)  # 1 + 1.2 * charged
    assert profile.coverage() == pytest.approx([10 / 13, 5 / 7, 1 / 2.2])
    assert profile.overhead_ms() == pytest.approx(1.0)
    assert LatencyProfile([1.0, 0.5], [9.0, 4.0], {"a": [10.0, 5.0]}).overhead_ms() == 0.0  # never negative


def test_terms_add_up_to_the_measured_latency_at_the_profiled_widths(analysis, cache):
    metric = Latency(cache=cache)
    terms = metric.terms(analysis)
    profile = metric.profile
    assert profile.keep == [1.0, *latency.WIDTHS]
    assert all(a > 0 for a in profile.latency_ms) and profile.latency_ms[0] > profile.latency_ms[-1]
    compute = {t.name for t in get_metric("flops").terms(analysis)}
    assert compute <= {t.name for t in terms}, "every compute node has a measured term"
    assert metric.profiled_totals(analysis) == pytest.approx(profile.latency_ms, rel=0.15)
    cost = CostModel(analysis, metric)
    assert cost.original_total == pytest.approx(profile.latency_ms[0], rel=0.15)
    widest = max(analysis.groups, key=lambda g: len(g.prunable))
    before = cost.total
    cost.remove(unit_counts(widest, widest.prunable[: len(widest.prunable) // 2]))
    assert 0 < cost.total < before


def test_profiles_are_cached(analysis, tmp_path, monkeypatch):
    calls = []
    profile_once = latency.profile_models

    def counting(graph, models, *args, **kwargs):
        calls.append(len(models))
        return profile_once(graph, models, *args, **kwargs)

    monkeypatch.setattr(latency, "profile_models", counting)
    first = Latency(cache=tmp_path, runs=3)
    totals = first.profiled_totals(analysis)
    assert calls == [1 + len(latency.WIDTHS)]
    assert len(list(tmp_path.glob("latency-*.json"))) == 1
    second = Latency(cache=tmp_path, runs=3)
    assert second.profiled_totals(analysis_of_a_fresh_load()) == pytest.approx(totals)
    assert len(calls) == 1, "the second run profiled again"
    Latency(Constraints(round_to=8), cache=tmp_path, runs=3).terms(analysis)
    assert len(calls) == 2, "other widths are another profile"


def analysis_of_a_fresh_load():
    return analyze_graph(load_model(EXAMPLE))


def prune_to_latency(config: PruneConfig, progress=None) -> PruneState:
    """The latency allocation between scoring and verification, without the optional passes."""
    passes = [Analyse(), Score(get_criterion(config.criterion_name)), AllocateLatency(), Rewrite(), Verify()]
    return Pipeline(passes, progress)(PruneState(config, graph=load_model(EXAMPLE)))


def test_default_pipeline_allocates_a_latency_target_with_the_latency_pass():
    allocation = [p for p in default_passes(PruneConfig(latency=0.5)) if p.name == "allocate"]
    assert [type(p) for p in allocation] == [AllocateLatency]


def test_latency_target_is_measured_or_explained(env_cache, caplog):
    """A 0.4 ms model times noisily, and on some machines its time falls off a step as widths
    shrink: the measured ratio lands near the target, or the error or a warning says why."""
    notes: list[str] = []
    try:
        state = prune_to_latency(PruneConfig(latency=0.6), notes.append)
    except TargetError as exc:
        assert "cannot reach --latency 0.6" in str(exc)
        return
    measured = state.latency_after_ms / state.latency_before_ms
    assert state.plan.achieved == pytest.approx(measured)
    warned = [r.getMessage() for r in caplog.records if "below the target by more than" in r.getMessage()]
    assert abs(measured - 0.6) <= 0.1 or warned, (measured, notes)
    assert state.fidelity is not None and state.model is not None
    assert any(n.startswith("latency ratio predicted") for n in notes), notes


def test_unreachable_latency_target_says_why(env_cache):
    with pytest.raises(TargetError, match=r"cannot reach --latency 0\.05.*latency"):
        prune_to_latency(PruneConfig(latency=0.05, min_keep=0.5))


def run_cli(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """The command with the fast pipeline's options (see conftest)."""
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "spa_compiler.cli", *map(str, args), *FAST_CLI]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_latency_with_another_target_is_a_one_line_error(tmp_path):
    result = run_cli(tmp_path, EXAMPLE, "--latency", "0.5", "--flops", "0.5", "-o", "out.onnx")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "exactly one target" in lines[0] and "--latency" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_cli_latency_reports_the_measured_ratio_without_bench_runs(tmp_path, env_cache):
    result = run_cli(tmp_path, EXAMPLE, "--latency", "0.6", "--bench-runs", "0", "-o", "out.onnx",
                     "--json-report", "r.json")
    if result.returncode != 0:  # a noisy tiny model may not get there: then one line saying why
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach --latency" in lines[0], result.stderr
        return
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target_kind"] == "latency" and report["latency_ratio"] is not None
    assert "measured latency ratio" in result.stdout


def test_next_budget_interpolates_once_the_target_is_bracketed():
    from spa_compiler.latency import next_budget

    assert next_budget([(0.6, 0.4)], 0.6) == pytest.approx(0.9)  # scaled by target / measured
    assert next_budget([(0.6, 0.3)], 0.6) == 0.99  # clipped
    # measured 0.35 at 0.6 and 0.98 at 0.99: linear between them
    assert next_budget([(0.6, 0.35), (0.99, 0.98)], 0.6) == pytest.approx(0.6 + 0.25 * 0.39 / 0.63)
    # the closest pair on each side is the one used
    tried = [(0.6, 0.35), (0.99, 0.98), (0.75, 0.75), (0.68, 0.65)]
    assert next_budget(tried, 0.6) == pytest.approx(0.6 + 0.25 * 0.08 / 0.30)
