"""Benchmark: prune full-size ResNet-50 and MobileNetV2 from ``models/`` to half their FLOPs.

    python -m models.benchmark [--runs 50] [--flops 0.5] [--json results.json]
    python -m models.benchmark --latency [0.5] [--runs 20]

For each model and for ``--round-to`` 16 (the default), 8 and 1 (no rounding), prints the time to
prune with the quick pipeline (``--criterion l2 --allocation score --refit 0``: load, analyse,
score, allocate, rewrite, verify, save), the peak resident memory of the pruning process, the
achieved FLOPs ratio, and the onnxruntime latency ratio at batch 1 with one thread (median of
``--runs``). Each pruning runs in a fresh process that imports no torch, so its time and memory
are what a user of ``spa-prune`` sees. A last row prunes ResNet-50 with the default pipeline
(second-order ranking, measured sensitivity, re-fit) and 256 calibration images (seeded random,
the shape of the input). Then, per row, each pass's seconds and the peak memory when it ended.

``--latency R`` prunes each model to ``--latency R`` instead (criterion l2, ``--allocation score``,
``--refit 0``: the quick pipeline, so that the times are those of the latency target), twice in
one fresh process: with an empty profile cache (the time includes profiling) and again with it
filled. It prints the latency
ratio measured afterwards, independently of the run (median of ``--runs`` rounds of original and
pruned model, one thread; by the CPU time of the inference thread, which the target uses, and by
the wall clock; the median of three such measurements), the ratio the run measured and the one its
profile predicted, the FLOPs ratio and both pruning times (with the latency allocation's share:
profiling, allocating and timing the result); then, per profiled width, the share of
the latency the charged kernels account for, the constant overhead, and how the terms' latency
ratio to the full model compares with a fresh timing's (1.00: they agree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .export import export_architecture
from .table import print_table, write_json

__all__ = ["main"]

MODELS = ("resnet50", "mobilenet_v2")

_WORKER = r"""
import json, re, sys, time
import numpy as np
from spa_compiler import PruneConfig, load_model, prune, synthetic_inputs
from spa_compiler.bench import measure_latency
import onnx
source, output, flops, round_to, runs, criterion = sys.argv[1:7]
flops, round_to, runs = float(flops), int(round_to), int(runs)
calibration = None
if criterion == "obs":
    shape = load_model(source).input_shapes["input"][1:]
    calibration = output + ".calib.npz"
    np.savez(calibration, input=np.random.default_rng(0).standard_normal((256, *shape)).astype(np.float32))
start = time.perf_counter()
quick = dict(allocation="score", refit_rounds=0) if criterion == "l2" else {}
report = prune(source, output, PruneConfig(flops=flops, round_to=round_to, bench_runs=0, criterion=criterion,
                                           calibration=calibration, calibration_samples=256, **quick))
elapsed = time.perf_counter() - start
# VmHWM: peak resident memory of this process image (ru_maxrss would include the parent's)
peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
graph = load_model(source)
feeds = synthetic_inputs(graph.input_shapes, graph.dtypes)
before = measure_latency(graph.model, feeds, runs=runs, warmup=5)
after = measure_latency(onnx.load(output), feeds, runs=runs, warmup=5)
print(json.dumps(dict(prune_seconds=elapsed, peak_mb=peak_mb, flops_ratio=report.flops_ratio,
                      params_ratio=report.params_ratio, latency_before_ms=before, latency_after_ms=after,
                      latency_ratio=after / before, timings=report.timings, stage_peak_mb=report.peak_mb)))
"""


def _run(source: Path, output: Path, flops: float, round_to: int, runs: int, criterion: str = "l2") -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER, str(source), str(output), str(flops), str(round_to), str(runs), criterion],
        check=True, capture_output=True, text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


_LATENCY_WORKER = r"""
import json, statistics, sys, time
from pathlib import Path
import onnx
from spa_compiler import CostModel, Pipeline, PruneConfig, PruneState, default_passes, synthetic_inputs
from spa_compiler.bench import measure_latencies
from spa_compiler.latency import CLOCK, Latency
from spa_compiler.rewrite import rewrite_model
from spa_compiler.stages import BuildReport, Load, Save
source, output, target, runs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
config = PruneConfig(latency=target, bench_runs=0, criterion="l2", allocation="score", refit_rounds=0)

def prune():
    start = time.perf_counter()
    state = Pipeline([Load(), *default_passes(config), Save(Path(output)), BuildReport()])(
        PruneState(config, source=Path(source)))
    return state, time.perf_counter() - start

first, first_seconds = prune()
state, cached_seconds = prune()
graph, analysis = state.graph, state.analysis
metric = Latency(config.constraints())
predicted = CostModel(analysis, metric)
for axis, indices in state.removed_by_axis.items():
    predicted.remove({axis: len(indices)})
feeds = synthetic_inputs(graph.input_shapes, graph.dtypes)
widths = [graph.model] + [rewrite_model(analysis, r) for r in metric.uniform_removals(analysis)[1:]]
fresh = measure_latencies(widths, feeds, runs, clock=CLOCK)
totals = metric.profiled_totals(analysis)
pruned = onnx.load(output)
cpu = [measure_latencies([graph.model, pruned], feeds, runs, clock=CLOCK) for _ in range(3)]
wall = [measure_latencies([graph.model, pruned], feeds, runs) for _ in range(3)]
print(json.dumps(dict(
    target=target, latency_ratio=statistics.median(a / b for b, a in cpu),
    wall_ratio=statistics.median(a / b for b, a in wall), run_ratio=state.plan.achieved,
    predicted_ratio=predicted.total / predicted.original_total, flops_ratio=state.report.flops_ratio,
    prune_seconds=first_seconds, cached_seconds=cached_seconds,
    allocate_seconds=first.timings["allocate"], cached_allocate_seconds=state.timings["allocate"],
    ms_before=statistics.median(b for b, _ in cpu), ms_after=statistics.median(a for _, a in cpu),
    keep=metric.profile.keep, coverage=metric.profile.coverage(),
    overhead_ms=metric.profile.overhead_ms(),
    agreement=[(t / totals[0]) / (f / fresh[0]) for t, f in zip(totals, fresh)],
)))
"""


def latency_section(target: float, runs: int) -> list[dict]:
    """Prune both models to ``--latency target`` (see the module docstring) and print the figures."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "SPA_PRUNE_CACHE": str(Path(folder) / "cache")}
        for name in MODELS:
            source = export_architecture(name, Path(folder) / f"{name}.onnx")
            completed = subprocess.run(
                [sys.executable, "-c", _LATENCY_WORKER, str(source), str(Path(folder) / f"{name}_latency.onnx"),
                 str(target), str(runs)], check=True, capture_output=True, text=True, env=env,
            )
            rows.append(dict(model=name, **json.loads(completed.stdout.strip().splitlines()[-1])))
    print_table(rows, [
        ("model", "model", "14s"), ("target", "target", "6.2f"), ("latency_ratio", "latency", "7.3f"),
        ("wall_ratio", "wall", "6.3f"), ("run_ratio", "run", "6.3f"), ("predicted_ratio", "predicted", "9.3f"),
        ("flops_ratio", "FLOPs", "6.3f"), ("prune_seconds", "prune s", "8.1f"), ("allocate_seconds", "(alloc)", "7.1f"),
        ("cached_seconds", "cached s", "8.1f"), ("cached_allocate_seconds", "(alloc)", "7.1f"),
        ("ms_before", "ms before", "9.2f"), ("ms_after", "ms after", "9.2f"),
    ])
    for row in rows:
        print(f"{row['model']}: profiled widths " + " ".join(f"{k:.0%}" for k in row["keep"])
              + "; kernels cover " + " ".join(f"{c:.2f}" for c in row["coverage"])
              + f" of the latency, overhead {row['overhead_ms']:.2f} ms; latency ratio of the terms over a fresh"
              + " timing's " + " ".join(f"{a:.2f}" for a in row["agreement"]))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="latency runs per model (median)")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--latency", type=float, nargs="?", const=0.5, help="prune to this measured latency instead")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.latency is not None:
        rows = latency_section(args.latency, args.runs)
        write_json(args.json, rows)
        return rows
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            source = export_architecture(name, Path(folder) / f"{name}.onnx")
            for round_to in (16, 8, 1):
                result = _run(source, Path(folder) / f"{name}_{round_to}.onnx", args.flops, round_to, args.runs)
                rows.append(dict(model=name, criterion="l2", round_to=round_to, **result))
        source = Path(folder) / "resnet50.onnx"
        result = _run(source, Path(folder) / "resnet50_obs.onnx", args.flops, 16, args.runs, "obs")
        rows.append(dict(model="resnet50", criterion="obs", round_to=16, **result))
    print_table(rows, [
        ("model", "model", "14s"), ("criterion", "criterion", "9s"), ("round_to", "round-to", "8d"),
        ("prune_seconds", "prune s", "8.2f"), ("peak_mb", "peak MB", "8.0f"), ("flops_ratio", "FLOPs", "6.3f"),
        ("latency_ratio", "latency", "8.3f"), ("latency_before_ms", "ms before", "9.2f"),
        ("latency_after_ms", "ms after", "9.2f"),
    ])
    print("\nper pass: seconds (peak MB when it ended)")
    for row in rows:
        stages = ", ".join(f"{name} {seconds:.2f} s ({row['stage_peak_mb'][name]:.0f})" for name, seconds in row["timings"].items())
        print(f"  {row['model']} {row['criterion']} round-to {row['round_to']}: {stages}")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
