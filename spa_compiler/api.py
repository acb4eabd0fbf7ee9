"""The default pipelines: ``prune_graph`` (in memory) and ``prune`` (file to file), and ``analyze``."""

from __future__ import annotations

import os
from pathlib import Path

from .analysis import Analysis, analyze_graph
from .config import PruneConfig
from .criteria import get_criterion
from .depth_prune import KeepWidths, PruneDepth
from .evaluate import Evaluate, EvaluateOriginal
from .head_rotation import RotateHeads
from .ir import Graph, load_model
from .model_files import check_input_path, check_output_path
from .latency import AllocateLatency
from .pipeline import PassLike, Pipeline
from .refit import Refit
from .reinit import Reinitialise
from .report import PruneReport
from .sensitivity import MeasureSensitivity
from .stages import (
    Allocate, Analyse, BuildReport, CollectStatistics, HeldOutOnly, Load, MeasureLatency, RestoreOutputs, Rewrite, Save,
    Score, Verify,
)
from .state import Progress, PruneState

__all__ = ["default_passes", "input_passes", "output_passes", "prune_graph", "prune", "analyze"]


def default_passes(config: PruneConfig) -> list[PassLike]:
    """In memory, from a loaded graph to the verified pruned model: (remove residual branches,)
    analyse, calibrate (or, when nothing uses statistics, read ``--calib`` samples to measure
    fidelity on), (rotate attention heads,) score, measure sensitivity, allocate,
    (compensate), re-fit, rewrite, verify, restore (the outputs that are not tensors). The
    criterion and the options decide the optional passes; a ``latency`` target allocates on measured latency and times the result;
    ``--units depth`` removes residual branches only (:mod:`spa_compiler.depth_prune`)."""
    config.target(), config.constraints()
    criterion = get_criterion(config.criterion_name)
    if config.units == "depth":
        passes: list[PassLike] = [PruneDepth(None), Analyse(), KeepWidths(), Rewrite()]
        return [*passes, Verify(), RestoreOutputs()] if config.verify else [*passes, RestoreOutputs()]
    passes = [PruneDepth(config.depth), Analyse()] if config.depth else [Analyse()]
    if config.needs_statistics:
        passes.append(CollectStatistics())
        if config.head_dims is not False:
            passes.append(RotateHeads())
    elif config.calibration and config.verify:
        passes.append(HeldOutOnly())
    passes.append(Score(criterion))
    if config.allocation == "sensitivity":
        passes.append(MeasureSensitivity())
    passes.append(AllocateLatency() if config.target().kind == "latency" else Allocate())
    if criterion.compensation is not None:
        passes.append(criterion.compensation())
    if config.refit_rounds:
        passes.append(Refit(config.refit_rounds, residual=config.refit_residual))
    passes.append(Rewrite())
    if config.verify:
        passes.append(Verify())
    passes.append(RestoreOutputs())
    return passes


def prune_graph(graph: Graph, config: PruneConfig, progress: Progress | None = None) -> PruneState:
    """Prune a loaded model in memory (no file is read or written)."""
    return Pipeline(default_passes(config), progress)(PruneState(config, graph=graph))


def prune(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: PruneConfig,
    progress: Progress | None = None,
) -> PruneReport:
    """Prune ``model_path`` into ``output_path`` (written atomically) and report what changed."""
    source = Path(model_path)
    check_input_path(source)
    output = check_output_path(output_path, source=model_path)
    passes = [*input_passes(config), *default_passes(config), *output_passes(config, output)]
    state = Pipeline(passes, progress)(PruneState(config, source=source))
    return state.report


def input_passes(config: PruneConfig) -> list[PassLike]:
    """Before the model is pruned: (score the input model with ``--eval``, so that a script that
    cannot score it fails before any work is done,) load it."""
    return [EvaluateOriginal(config.evaluation), Load()] if config.evaluation else [Load()]


def output_passes(config: PruneConfig, output: Path) -> list[PassLike]:
    """After the pruned model is verified: (give it fresh weights with ``--reinit``,) save it, score
    it with ``--eval``, time it, report."""
    evaluate = [Evaluate(config.evaluation)] if config.evaluation else []
    reinit = [Reinitialise()] if config.reinit else []
    return [*reinit, Save(output), *evaluate, MeasureLatency(), BuildReport()]


def analyze(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
            exclude: tuple[str, ...] = (), prune_hidden: bool = False, head_dims: bool = False) -> Analysis:
    """Load a model and return its groups, without changing anything."""
    return analyze_graph(load_model(path, input_shapes), exclude, prune_hidden, head_dims)
