"""Benchmark: test accuracy of a trained digits ResNet pruned by each criterion, with no fine-tuning anywhere.

    python -m models.obs_benchmark [--json results.json] [--epochs 15] [--samples 512] [--keep DIR]

Trains ``models.digits.digits_resnet`` (width 32/64, stride-2 block with a 1x1 projection)
once on scikit-learn's bundled 8x8 digits (80/20 split, ``random_state=0``, fixed seed),
exports it to ONNX and writes the first ``--samples`` training images to a calibration
``.npz`` (key "input").  It then prunes the exported file to 0.75, 0.5 and 0.3 of its FLOPs
with each criterion -- l1, l2, random, activation (with calibration), obs (with calibration)
and obs data-free (no calibration), the obs_relative ablation, obs_joint with calibration and
data-free -- through ``spa_compiler.prune`` and measures the pruned
model's top-1 accuracy on the 360 held-out images with onnxruntime.  Nothing is fine-tuned,
before or after pruning: the numbers say how much of the trained function each criterion keeps.

All options are the ``spa-prune`` defaults except ``round_to=8``: this model is narrow (32 and
64 channels), and rounding kept widths to multiples of 16 would leave the allocator only a few
choices per group (and overshoot the target, e.g. 0.687 for 0.75).

The table has one row per criterion and, per target, ``accuracy (achieved FLOPs ratio)``.  A
criterion the compiler does not provide yet (``spa_compiler.available_criteria()``; an unknown
criterion error; ``PruneConfig`` without a ``calibration`` field for data-aware rows) shows
"n/a"; another pruning error shows "error" and its message goes to the JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from spa_compiler import PruneConfig, SpaError, available_criteria, prune

from .digits import (
    DEFAULT_EPOCHS,
    export_digits_model,
    load_digits_split,
    onnx_accuracy,
    save_calibration,
)

__all__ = ["CRITERIA", "ROUND_TO", "TARGETS", "main", "run"]

TARGETS = (0.75, 0.5, 0.3)
ROUND_TO = 8
SEED = 0

CRITERIA: tuple[tuple[str, str, bool], ...] = (
    # (row label, criterion name, uses calibration data)
    ("l1", "l1", False),
    ("l2", "l2", False),
    ("random", "random", False),
    ("activation", "activation", True),
    ("obs", "obs", True),
    ("obs (data-free)", "obs", False),
    ("obs_relative (ablation)", "obs_relative", True),
    ("obs_joint", "obs_joint", True),
    ("obs_joint (data-free)", "obs_joint", False),
)


def _prune_one(
    source: Path, output: Path, target: float, criterion: str, calibration: Path | None, samples: int
) -> dict[str, Any]:
    config = PruneConfig(
        flops=target, criterion=criterion, round_to=ROUND_TO, bench_runs=0, seed=SEED,
        calibration=str(calibration) if calibration is not None else None, calibration_samples=samples,
    )
    start = time.perf_counter()
    report = prune(source, output, config)
    return {
        "flops_ratio": report.flops_ratio,
        "params_ratio": report.params_ratio,
        "prune_seconds": time.perf_counter() - start,
    }


def run(folder: Path, epochs: int = DEFAULT_EPOCHS, samples: int = 512) -> dict[str, Any]:
    """Train, export, write calibration and prune every (criterion, target) in ``folder``."""
    x_train, x_test, _, y_test = load_digits_split(SEED)
    start = time.perf_counter()
    source, accuracy = export_digits_model(folder / "digits.onnx", epochs=epochs, seed=SEED)
    train_seconds = time.perf_counter() - start
    calibration = save_calibration(folder / "digits_calib.npz", x_train, samples=samples)
    rows = []
    for label, criterion, calibrated in CRITERIA:
        row: dict[str, Any] = {"label": label, "criterion": criterion, "calibration": calibrated, "results": {},
                               "status": "ok"}
        for target in TARGETS:
            output = folder / f"digits_{criterion}{'_calib' if calibrated else ''}_{target:g}.onnx"
            try:
                result = _prune_one(source, output, target, criterion, calibration if calibrated else None, samples)
            except SpaError as error:
                row["results"][str(target)] = {"status": "error", "error": str(error)}
                continue
            result.update(status="ok", accuracy=onnx_accuracy(output, x_test, y_test))
            row["results"][str(target)] = result
        rows.append(row)
    return {
        "model": {
            "accuracy": accuracy, "epochs": epochs, "seed": SEED, "train_export_seconds": train_seconds,
            "test_images": len(y_test), "calibration_samples": min(samples, len(x_train)),
        },
        "round_to": ROUND_TO,
        "targets": list(TARGETS),
        "available_criteria": sorted(available_criteria()),
        "rows": rows,
    }


def _cell(row: dict[str, Any], target: float) -> str:
    if row["status"] != "ok":
        return "n/a"
    result = row["results"].get(str(target), {})
    if result.get("status") != "ok":
        return "error"
    return f"{result['accuracy']:.3f} ({result['flops_ratio']:.3f})"


def render(results: dict[str, Any]) -> str:
    unpruned = f"{results['model']['accuracy']:.3f}"
    header = f"{'criterion':16s} {'unpruned':>9s} " + " ".join(f"{'flops ' + format(t, 'g'):>15s}" for t in TARGETS)
    lines = [
        (f"digits ResNet, {results['model']['test_images']} test images, round_to={results['round_to']}, "
        "no fine-tuning; cells: accuracy (achieved FLOPs ratio)"),
        header,
    ]
    for row in results["rows"]:
        lines.append(f"{row['label']:16s} {unpruned:>9s} " + " ".join(f"{_cell(row, t):>15s}" for t in TARGETS))
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"  {row['label']}: n/a, {row['reason']}")
        for target, result in row["results"].items():
            if result.get("status") == "error":
                lines.append(f"  {row['label']} at flops {target}: {result['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default %(default)s)")
    parser.add_argument("--samples", type=int, default=512, help="calibration images (default %(default)s)")
    parser.add_argument("--keep", type=Path, help="write the models and calibration here instead of a temporary folder")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run(args.keep, args.epochs, args.samples)
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = run(Path(folder), args.epochs, args.samples)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
