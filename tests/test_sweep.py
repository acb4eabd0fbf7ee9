"""Sweeps: every point's figures equal a single run's, the analysis and statistics are computed once,
failed points are reported, the report files are written, statistics in shards add up, and Ray
gives the in-process figures (a local 2-CPU cluster started here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import spa_compiler.stages as stages
from spa_compiler import PruneConfig, load_model
from spa_compiler.analysis import analyze_graph
from spa_compiler.api import prune
from spa_compiler.calibrate import add_statistics, collect_statistics, consumer_layers, statistics_batch_size
from spa_compiler.cli import written_after
from spa_compiler.distributed import statistics_shards
from spa_compiler.errors import OutputError
from spa_compiler.report_files import chosen_point, pareto_points, width_bars, write_run_report, write_sweep_report
from spa_compiler.sweep import SweepPoint, run_sweep, sweep_points
from spa_compiler.synthetic import synthetic_calibration
from tests.test_cli import EXAMPLE, assert_one_line_error, run_cli

# The fast pipeline spelled out (module fixtures are built before conftest's fixture patches the
# defaults), 32 synthetic calibration samples, no timing runs; every group keeps half its channels,
# so a tenth of the FLOPs is out of reach.
SMALL = {"allocation": "score", "refit_rounds": 0, "calibration_samples": 32, "bench_runs": 0, "min_keep": 0.5}
EVAL = """
import numpy as np, onnxruntime as ort
def score(path):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(3).standard_normal((4, 1, 3, 32, 32)).astype(np.float32)
    return float(np.mean([session.run(None, {"input": x})[0] ** 2 for x in xs]))
"""


def figures(report) -> dict:
    """Everything a report measures but the paths, timings, memory and latencies (they differ run to run)."""
    data = report.to_dict()
    for key in ("input", "output", "timings", "peak_mb", "latency_before_ms", "latency_after_ms", "latency_ratio"):
        data.pop(key)
    return data


@pytest.fixture(scope="module")
def eval_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "task.py"
    path.write_text(EVAL)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, eval_script):
    """Two criteria (l2 collects no statistics, obs does) at two reachable targets and one that is not,
    analysis and statistics calls counted."""
    calls = {"analyse": 0, "statistics": 0}
    analyse, collect = stages.analyze_graph, stages.collect_statistics

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    patch = pytest.MonkeyPatch()
    patch.setattr(stages, "analyze_graph", counted("analyse", analyse))
    patch.setattr(stages, "collect_statistics", counted("statistics", collect))
    try:
        base = PruneConfig(**SMALL, evaluation=str(eval_script))
        directory = tmp_path_factory.mktemp("sweep")
        points = sweep_points(["l2", "obs"], {"flops": [0.7, 0.5, 0.1]})
        result = run_sweep(EXAMPLE, base, points, directory)
    finally:
        patch.undo()
    return result, calls, base, directory


def test_sweep_shares_one_analysis_and_one_statistics_collection(swept):
    result, calls, _, _ = swept
    assert len(result.points) == 6
    assert calls == {"analyse": 1, "statistics": 1}


def test_failed_point_is_reported_and_the_sweep_goes_on(swept):
    result = swept[0]
    failed = [r for r in result.points if r.error is not None]
    assert [r.point.target_value for r in failed] == [0.1, 0.1]
    assert all("cannot reach --flops 0.1" in r.error and r.report is None for r in failed)
    assert all(r.report is not None for r in result.points if r.point.target_value != 0.1)


def test_sweep_figures_equal_single_runs(swept, tmp_path):
    result, _, base, directory = swept
    for r in result.points:
        if r.report is None:
            continue
        single = prune(EXAMPLE, tmp_path / r.point.filename, r.point.config(base))
        assert figures(r.report) == figures(single), r.point.label
        assert (directory / "models" / r.point.filename).read_bytes() == (tmp_path / r.point.filename).read_bytes()
        assert abs(r.report.flops_ratio - r.point.target_value) <= 0.02
    assert result.eval_before == single.eval_before


def test_sweep_report_files(swept):
    result, _, _, directory = swept
    assert write_sweep_report(result, directory) is None
    data = json.loads((directory / "sweep.json").read_text())
    assert [p["label"] for p in data["points"]] == [r.point.label for r in result.points]
    finished = [(p, r) for p, r in zip(data["points"], result.points) if r.report is not None]
    for point, r in finished:
        assert point["report"]["macs_after"] == r.report.macs_after
        assert point["report"]["fidelity"]["cosine"] == r.report.fidelity.cosine
        assert point["report"]["eval_after"] == r.report.eval_after
    markdown = (directory / "report.md").read_text()
    assert "## Criterion l2" in markdown and "## Criterion obs" in markdown
    assert "## Chosen points" in markdown and "## What blocked what" in markdown
    assert "graph output 'output'" in markdown  # the classifier's outputs are blocked
    assert markdown.count("failed: cannot reach --flops 0.1") == 2
    png = (directory / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    obs = [r for r in result.points if r.point.criterion == "obs"]
    pareto = pareto_points(obs)
    assert pareto[0].point.target_value == 0.5 and all(r.report is not None for r in pareto)
    chosen = chosen_point(obs)
    assert chosen is None or chosen.report.eval_after >= 0.9 * chosen.report.eval_before


def test_reports_without_matplotlib_say_so(swept, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    result = swept[0]
    note = write_sweep_report(result, tmp_path / "sweep")
    assert "spa-prune[plots]" in note
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["report.md", "sweep.json"]
    assert "pareto.png" not in (tmp_path / "sweep" / "report.md").read_text()
    note = write_run_report(result.points[0].report, tmp_path / "run")
    assert "spa-prune[plots]" in note and (tmp_path / "run" / "report.md").exists()


def test_run_report_widths(swept, tmp_path):
    report = swept[0].points[1].report  # l2 at half the FLOPs
    assert write_run_report(report, tmp_path) is None
    markdown = (tmp_path / "report.md").read_text()
    for group in report.groups:
        assert f"| {group.name} | {group.kind} | {group.channels_before} | {group.channels_after} |" in markdown
    assert (tmp_path / "widths.png").read_bytes()[:4] == b"\x89PNG"
    bars = width_bars(report)  # what the picture draws: shares kept, so one wide group flattens none
    assert [label for _, _, label, _ in bars] == [f"{g.channels_after}/{g.channels_before}" for g in report.groups]
    shares = [g.channels_after / g.channels_before for g in report.groups]
    assert [share for _, share, _, _ in bars] == pytest.approx(shares)
    assert min(share for _, share, _, _ in bars) <= 0.75
    assert [blocked for *_, blocked in bars] == [g.blocked == g.channels_before for g in report.groups]


def _statistics_inputs():
    graph = load_model(EXAMPLE)
    layers = consumer_layers(analyze_graph(graph))
    data, _ = synthetic_calibration(graph, 20, seed=0)
    return graph, layers, data


def _assert_statistics_equal(single, sharded, rtol: float = 1e-9) -> None:
    """Equal up to the order of float64 additions (shards make the same float32 products of
    each batch's rows); ``rtol`` 1e-6 where the shards ran with another number of BLAS threads
    (Ray's workers run one), which rounds each float32 product differently."""
    assert single.keys() == sharded.keys()
    for node, stats in single.items():
        assert sharded[node].rows == stats.rows > 0
        scale = np.abs(stats.hessian).max()
        assert np.abs(sharded[node].hessian - stats.hessian).max() <= rtol * scale, node


def _assert_figures_close(a, b, label: str, path: str = "") -> None:
    """Equal figures, the measured ones (floats) to 1e-5 relative: the statistics they come
    from are equal only up to rounding (see :func:`_assert_statistics_equal`)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (label, path)
        for key in a:
            _assert_figures_close(a[key], b[key], label, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), (label, path)
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_figures_close(x, y, label, f"{path}[{k}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-12), (label, path)
    else:
        assert a == b, (label, path)


def test_statistics_in_shards_add_up_to_one_collection():
    """20 samples in batches of 4 (the example declares a batch of 1, which its statistics runs
    free), in 2 and in 3 shards of whole batches."""
    graph, layers, data = _statistics_inputs()
    assert statistics_batch_size(graph, 4, layers) == 4
    single = collect_statistics(graph, layers, data, 4, seed=0)
    for shards in (2, 3):
        plan = statistics_shards(20, 4, shards)
        assert sum(count for _, count in plan) == 5 and len(plan) == shards
        parts = [collect_statistics(graph, layers, {k: v[4 * first:4 * (first + count)] for k, v in data.items()},
                                    4, 0, None, first, 5) for first, count in plan]
        _assert_statistics_equal(single, add_statistics(parts))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_and_sharded_statistics_equal_in_process(ray_cluster, swept, tmp_path, capsys):
    from spa_compiler.distributed import RayEngine, ShardedStatistics

    graph, layers, data = _statistics_inputs()
    config = PruneConfig(calibration_batch=8)
    sharded = ShardedStatistics(2).collect(graph, layers, data, config, lambda done, total: None)
    _assert_statistics_equal(collect_statistics(graph, layers, data, 8, seed=0), sharded, rtol=1e-6)

    in_process, _, base, _ = swept
    start = time.perf_counter()
    on_ray = run_sweep(EXAMPLE, base, [r.point for r in in_process.points], tmp_path, RayEngine())
    with capsys.disabled():
        print(f"\nsweep of 6 points: in process {in_process.wall_seconds:.1f} s, "
              f"on Ray (2 CPUs) {time.perf_counter() - start:.1f} s")
    assert on_ray.engine == "ray"
    for a, b in zip(on_ray.points, in_process.points):
        assert a.error == b.error
        if a.report is not None:
            _assert_figures_close(figures(a.report), figures(b.report), a.point.label)


FAST_SWEEP = ("--allocation", "score", "--refit", "0", "--bench-runs", "3")


def test_cli_sweep_writes_the_three_files(tmp_path):
    out = tmp_path / "out"
    result = run_cli(tmp_path, "sweep", EXAMPLE, "--flops", "0.7,0.5", "--criterion", "l2,l1", *FAST_SWEEP,
                     "--report", out, columns=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["models", "pareto.png", "report.md", "sweep.json"]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["label"] for p in points] == ["l2 --flops 0.7", "l2 --flops 0.5", "l1 --flops 0.7", "l1 --flops 0.5"]
    assert all(abs(p["report"]["flops_ratio"] - p["target_value"]) <= 0.02 for p in points)
    assert all(p["report"]["latency_after_ms"] > 0 for p in points)
    assert "in-process" in result.stdout and "wall time" in result.stdout


@pytest.mark.parametrize("args, pattern", [
    (("--flops", "0.7,abc"), r"--flops takes fractions separated by commas"),
    (("--flops", "0.7", "--criterion", "l2,nope"), r"unknown criterion 'nope'"),
])
def test_cli_sweep_bad_input_is_one_line(tmp_path, args, pattern):
    result = run_cli(tmp_path, "sweep", EXAMPLE, *args, *FAST_SWEEP, "--report", tmp_path / "out")
    assert_one_line_error(result, pattern)
    assert not (tmp_path / "out").exists()


def test_cli_single_run_report(tmp_path):
    result = run_cli(tmp_path, EXAMPLE, "--flops", "0.5", "-o", tmp_path / "small.onnx", "--report", tmp_path / "rep")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.md", "widths.png"]
    assert "## Widths per group" in (tmp_path / "rep" / "report.md").read_text()


def test_a_point_listed_twice_runs_once():
    points = sweep_points(["l2", "obs", "l2"], {"flops": [0.5, 0.7, 0.50], "params": [0.5]})
    assert [p.label for p in points] == [
        SweepPoint(c, k, v).label for c, k, v in
        [("l2", "flops", 0.5), ("l2", "flops", 0.7), ("l2", "params", 0.5),
         ("obs", "flops", 0.5), ("obs", "flops", 0.7), ("obs", "params", 0.5)]
    ]


def test_cli_report_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes").write_text("")
    result = run_cli(tmp_path, EXAMPLE, "--flops", "0.5", "-o", tmp_path / "small.onnx", "--report", tmp_path / "notes" / "rep")
    assert_one_line_error(result, r"cannot write the report in .*notes/rep: .*notes is not a writable directory")
    assert not (tmp_path / "small.onnx").exists()


def test_sweep_models_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "models").write_text("")  # a file where the sweep's models folder goes
    result = run_cli(tmp_path, "sweep", EXAMPLE, "--flops", "0.7", *FAST_SWEEP, "--report", tmp_path / "out")
    assert_one_line_error(result, r"cannot create .*out/models for the sweep's models: File exists")


def test_a_write_failing_after_the_model_says_the_model_was_written(tmp_path):
    with pytest.raises(OutputError, match=r"small.onnx was written, but the report in rep could not be \(Permission denied\)"):
        with written_after(tmp_path / "small.onnx", "the report in rep"):
            raise PermissionError(13, "Permission denied")


def test_pruning_imports_neither_matplotlib_nor_ray(tmp_path):
    code = (
        "import sys; import spa_compiler.cli, spa_compiler.sweep_cli, spa_compiler.distributed\n"
        "from spa_compiler import PruneConfig; from spa_compiler.api import prune\n"
        f"prune({str(EXAMPLE)!r}, {str(tmp_path / 'small.onnx')!r}, PruneConfig(flops=0.5, criterion='l2', "
        "allocation='score', refit_rounds=0, bench_runs=0))\n"
        "print(sorted(m for m in ('matplotlib', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
