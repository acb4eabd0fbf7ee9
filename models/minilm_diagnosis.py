"""Diagnosis: what holds all-MiniLM-L6-v2 short of its goal at ``--flops 0.5`` with ``--calib``.

    python -m models.minilm_diagnosis [--flops 0.5] [--samples 128]

The accuracy benchmark calibrates MiniLM on 128 sentences (``models.minilm_task``). This
command prunes it once more with a second calibration file that also holds the benchmark's 300
test sentences (after the 128's first 32, which the pipeline holds out, and before their other
96): a diagnosis, not a result, since it calibrates on the text it is measured on. Then it
crosses the two runs through the pipeline's passes (:mod:`spa_compiler.pipeline`):

- the widths one run chose (units removed per group), applied in the other run's channel order
  with its statistics, compensation and re-fit (the ``allocate`` pass replaced by
  :class:`KeepCounts`);
- the statistics, channel choice and compensation of one run (every pass up to ``compensate``),
  the re-fit on the other's calibration samples (:class:`ReplaceSamples` inserted after it).

Each row prints the mean cosine of the pruned sentence embeddings to the original ones over the
300 test sentences and over the 65 written ones among them, and the FLOPs ratio. Where the
widths come from matters little when the statistics are the same; which samples the
statistics, the compensation and the re-fit saw, a lot.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from spa_compiler import Pipeline, PruneConfig, PruneState
from spa_compiler.allocate import Plan
from spa_compiler.api import default_passes, output_passes
from spa_compiler.pipeline import Pass
from spa_compiler.rewrite import removed_indices
from spa_compiler.stages import Load

from .minilm_task import MiniLMTask
from .table import print_table
from .tasks import write_calibration

__all__ = ["KeepCounts", "ReplaceSamples", "main"]

HELD_OUT = 32  # calibration samples the pipeline sets aside to measure fidelity on (the first ones)


class KeepCounts(Pass):
    """Allocation to given widths: ``counts[group id]`` units removed from each group, its
    lowest-ranked first (:meth:`~spa_compiler.groups.Group.ranked` by this run's scores)."""

    name, description = "allocate", "removing the given number of units per group"
    requires, provides = ("analysis", "scores"), ("plan", "removed_by_axis")

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts

    def run(self, state: PruneState) -> PruneState:
        groups = {group.id: group for group in state.analysis.groups}
        removed = {gid: groups[gid].ranked(state.scores[gid])[:count] for gid, count in self.counts.items()}
        state.plan = Plan(removed=removed, achieved=float("nan"))  # the report measures the result
        state.removed_by_axis = removed_indices(state.analysis, removed)
        return state


class ReplaceSamples(Pass):
    """The calibration samples the passes after it run on (the re-fit's), taken from another run."""

    name, description = "replace samples", "taking the other run's calibration samples"
    requires, provides = ("calibration_data",), ("calibration_data",)

    def __init__(self, samples: dict[str, np.ndarray]) -> None:
        self.samples = samples

    def run(self, state: PruneState) -> PruneState:
        state.calibration_data = self.samples
        return state


def _pipeline(config: PruneConfig, output: Path | None = None) -> Pipeline:
    """Load, the default passes, and (given an ``output``) save and report."""
    return Pipeline([Load(), *default_passes(config), *(output_passes(config, output) if output else [])])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=128, help="calibration sentences (default %(default)s)")
    args = parser.parse_args(argv)
    task = MiniLMTask()
    source, shapes = task.source()
    with tempfile.TemporaryDirectory(prefix="spa_minilm_diagnosis_") as name:
        folder = Path(name)
        calibration = task.calibration_inputs(args.samples)
        with_test = {key: np.concatenate([calibration[key][:HELD_OUT], task.test_inputs[key],
                                          calibration[key][HELD_OUT:]]) for key in calibration}
        files = {"calibration": write_calibration(folder / "calibration.npz", calibration),
                 "with test": write_calibration(folder / "with_test.npz", with_test)}
        configs = {
            label: PruneConfig(flops=args.flops, round_to=task.round_to, bench_runs=0, input_shapes=shapes,
                               calibration=str(path), calibration_samples=len(next(iter(data.values()))))
            for (label, path), data in zip(files.items(), (calibration, with_test))
        }
        output = folder / "pruned.onnx"
        rows, counts, samples = [], {}, {}

        def measure(description: str, config: PruneConfig, pipeline: Pipeline) -> PruneState:
            state = pipeline(PruneState(config, source=source))
            metrics = task.metrics(output)
            rows.append(dict(run=description, cosine=metrics["mean cosine"], written=metrics["written cosine"],
                             flops=state.report.flops_ratio))
            print(f"{description}: cosine {metrics['mean cosine']:.3f}, written {metrics['written cosine']:.3f}, "
                  f"FLOPs {state.report.flops_ratio:.3f}", flush=True)
            return state

        for label, config in configs.items():
            state = measure(f"{label} sentences", config, _pipeline(config, output))
            counts[label] = {gid: len(units) for gid, units in state.plan.removed.items()}
            samples[label] = state.calibration_data
        for own, other in (("calibration", "with test"), ("with test", "calibration")):
            config = configs[own]
            measure(f"widths of '{other}', the rest of '{own}'", config,
                    _pipeline(config, output).replace("allocate", KeepCounts(counts[other])))
            measure(f"'{own}' up to compensation, the re-fit on '{other}'", config,
                    _pipeline(config, output).insert_after("compensate", ReplaceSamples(samples[other])))
    print(f"\nall-MiniLM-L6-v2 at --flops {args.flops:g}; 'calibration': {args.samples} calibration sentences, "
          f"'with test': the same and the {task.test_samples} test sentences")
    print_table(rows, [("run", "run", "58s"), ("cosine", "cosine", "7.3f"), ("written", "written", "8.3f"),
                       ("flops", "FLOPs", "6.3f")])
    return rows


if __name__ == "__main__":
    main()
