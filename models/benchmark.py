"""Benchmark: prune full-size ResNet-50 and MobileNetV2 from ``models/`` to half their FLOPs.

    python -m models.benchmark [--runs 50] [--flops 0.5] [--json results.json]

For each model and for ``--round-to`` 16 (the default), 8 and 1 (no rounding), prints the time to
prune (load, analyse, score, allocate, rewrite, verify, save), the peak resident memory of the
pruning process, the achieved FLOPs ratio, and the onnxruntime latency ratio at batch 1 with one
thread (median of ``--runs``). Each pruning runs in a fresh process that imports no torch, so
its time and memory are what a user of ``spa-prune`` sees. A last row prunes ResNet-50 with
``--criterion obs`` and 256 calibration images (seeded random, the shape of the input).
"""

from __future__ import annotations

import argparse
import json
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
report = prune(source, output, PruneConfig(flops=flops, round_to=round_to, bench_runs=0, criterion=criterion,
                                           calibration=calibration, calibration_samples=256))
elapsed = time.perf_counter() - start
# VmHWM: peak resident memory of this process image (ru_maxrss would include the parent's)
peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
graph = load_model(source)
feeds = synthetic_inputs(graph.input_shapes, graph.dtypes)
before = measure_latency(graph.model, feeds, runs=runs, warmup=5)
after = measure_latency(onnx.load(output), feeds, runs=runs, warmup=5)
print(json.dumps(dict(prune_seconds=elapsed, peak_mb=peak_mb, flops_ratio=report.flops_ratio,
                      params_ratio=report.params_ratio, latency_before_ms=before, latency_after_ms=after,
                      latency_ratio=after / before, timings=report.timings)))
"""


def _run(source: Path, output: Path, flops: float, round_to: int, runs: int, criterion: str = "l2") -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER, str(source), str(output), str(flops), str(round_to), str(runs), criterion],
        check=True, capture_output=True, text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="latency runs per model (median)")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
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
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
