"""What a zoo benchmark prints for one ONNX file: the default pipeline's outcome at a target, and
the exactness check on the same graph with random weights (no PyTorch needed)."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path

from spa_compiler import PruneConfig, SpaError, load_model, prune
from spa_compiler.verify import require_runnable

from .exactness import RTOL, randomize_weights, steered_error

__all__ = ["EXACTNESS", "chosen_models", "exactness", "pruned_outcome"]

EXACTNESS = PruneConfig(ratio=0.5, round_to=1, min_keep=0.0, criterion="l2", allocation="score", refit_rounds=0,
                        bench_runs=0, verify=False)


def pruned_outcome(source: Path, output: Path, config: PruneConfig) -> str:
    """The achieved FLOPs ratio, the groups pruned, the attention groups rotated and the cosine
    of the outputs to the original's on samples the statistics did not see (and the decisions
    kept, where the outputs hold any), or the error that stopped the pruning (its first clause)."""
    try:
        report = prune(source, output, config)
    except SpaError as error:
        return str(error).split(";")[0]
    pruned = sum(g.channels_after < g.channels_before for g in report.groups)
    fidelity = report.held_out_fidelity or report.fidelity
    agreement = f", top-1 {fidelity.top1_agreement:.3f}" if fidelity.top1_agreement is not None else ""
    return (f"FLOPs {report.flops_ratio:.3f}, {pruned} of {len(report.groups)} groups pruned, "
            f"{report.rotated_heads} rotated, cosine {fidelity.cosine:.4f}{agreement}")


def exactness(source: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """The exactness check's relative error (:func:`models.exactness.steered_error`: half of every
    group's channels, weights random) and channels removed, or the error that stopped it."""
    try:
        graph = load_model(source, shapes)
        require_runnable(graph)  # an export onnxruntime cannot run has nothing to compare
        error, removed = steered_error(randomize_weights(graph, seed=1), EXACTNESS)
    except SpaError as failure:
        return str(failure).split(";")[0]
    except RuntimeError as failure:  # the plan could not be steered: a defect
        return f"FAILED: {failure}"
    return f"{error:.1e} ({removed} channels)" + ("" if error <= RTOL else f" FAILED: above {RTOL:g}")


def chosen_models(parser: argparse.ArgumentParser, names: str, models: Collection[str]) -> list[str]:
    """The comma-separated ``names`` of a zoo's ``--models``, each one of ``models``; the
    parser's error naming the others otherwise."""
    chosen = names.split(",")
    unknown = [name for name in chosen if name not in models]
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(models)}")
    return chosen
