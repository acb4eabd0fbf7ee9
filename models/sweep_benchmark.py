"""Sweeps for the README, each by the ``spa-prune sweep`` command it prints and runs:

    python -m models.sweep_benchmark example [--out docs/sweep]
    python -m models.sweep_benchmark rec [--out DIR]

``example``: the bundled ``models/examples/mini_resnet.onnx`` (seeded, untrained weights, so the
quality is the output cosine against the original on synthetic inputs) at ``--flops 0.9 ... 0.5``,
criteria ``l2`` and ``obs``, the default pipeline otherwise. The sweep runs in a temporary
directory; ``pareto.png`` and ``report.md`` are copied into ``--out`` (the README's picture).

``rec``: the PP-OCRv4 recogniser (``rapidocr-onnxruntime``) at ``--flops 0.9,0.75,0.5``, ``obs`` and
``l2``, with 128 rendered calibration lines and ``--eval models/eval_rec.py`` (character accuracy on
150 other lines); everything, the pruned models too, is written into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .make_example import DEFAULT_EXAMPLE_PATH

__all__ = ["main", "sweep_command"]

TARGETS = "0.9,0.8,0.7,0.6,0.5"
REC_TARGETS = "0.9,0.75,0.5"  # fewer: a point of the recogniser takes minutes on two cores
HERE = Path(__file__).resolve().parent


def sweep_command(model: Path, report: Path, targets: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "spa_compiler.cli", "sweep", str(model), "--flops", targets, *options,
            "--report", str(report)]


def _run(command: list[str]) -> None:
    print("spa-prune " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)


def example(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="spa_sweep_") as folder:
        _run(sweep_command(DEFAULT_EXAMPLE_PATH, Path(folder), TARGETS, "--criterion", "l2,obs"))
        out.mkdir(parents=True, exist_ok=True)
        for name in ("pareto.png", "report.md"):
            shutil.copy(Path(folder) / name, out / name)
    print(f"wrote {out / 'pareto.png'} and {out / 'report.md'}")


def rec(out: Path) -> None:
    from .ocr_tasks import RecTask

    task = RecTask()
    source, shapes = task.source()
    calibration = task.calibration(out / "calibration.npz", 128)
    shape = "x".join(map(str, shapes["x"]))
    _run(sweep_command(source, out, REC_TARGETS, "--criterion", "obs,l2", "--input-shape", f"x={shape}",
                       "--round-to", str(task.round_to), "--calib", str(calibration),
                       "--eval", str(HERE / "eval_rec.py")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("example", "rec"))
    parser.add_argument("--out", type=Path, default=None, help="docs/sweep for example; required for rec")
    args = parser.parse_args(argv)
    if args.which == "example":
        example(args.out or HERE.parent / "docs" / "sweep")
    else:
        if args.out is None:
            parser.error("rec needs --out DIR")
        rec(args.out)


if __name__ == "__main__":
    main()
