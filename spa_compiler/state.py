"""The pruning state: what the passes of a pipeline learn about one model, field by field.

Each pass reads the fields it ``requires`` and fills the ones it ``provides``; nothing is filled
in twice or reached back into. In the default pipeline::

    load      -> graph
    depth     -> depth, graph                  (--depth / --units depth: residual branches removed)
    analyse   -> analysis
    calibrate -> statistics, calibration, calibration_data, held_out
    rotate    -> rotation, graph, analysis      (attention heads in a new basis, when head dims are the units)
    score     -> scores
    allocate  -> plan, removed_by_axis
    compensate-> compensated                   (criteria that re-fit the remaining weights)
    rewrite   -> model
    verify    -> fidelity, held_out_fidelity
    save      -> output
    latency   -> latency_before_ms, latency_after_ms
    evaluate  -> eval_before, eval_after        (--eval: the user's own task metric)
    report    -> report
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx

from .allocate import COST_EXPONENT
from .config import PruneConfig

if TYPE_CHECKING:
    from .allocate import Plan
    from .analysis import Analysis
    from .calibrate import LayerStatistics
    from .depth_prune import DepthResult
    from .head_rotation import HeadRotation
    from .ir import Graph
    from .report import PruneReport
    from .self_written import SelfWritten
    from .verify import Fidelity

__all__ = ["PruneState", "Progress"]

Progress = Callable[[str], None]


@dataclass
class PruneState:
    """One model on its way through a pipeline (see the module docstring for who fills what).

    ``calibration_data`` holds the inputs the statistics came from (keyed by graph input, first
    axis samples); ``held_out`` the samples kept aside to measure fidelity on (the user's, or
    synthetic ones in a data-free run, or sequences a language model wrote); ``written`` what a
    causal language model wrote in a data-free run (:func:`~spa_compiler.self_written.written_once`). ``compensated`` holds new values, before slicing, for
    constants a compensation pass re-fitted;
    the rewriter slices those instead of the originals. ``cost_exponent``: how allocation weighs
    a removal's score against the cost it saves (``score / saving ** cost_exponent``; see
    :func:`~spa_compiler.allocate.allocate`). ``timings`` holds seconds per pass, ``peak_mb`` the
    process's peak resident memory (MB) when each pass ended.
    """

    config: PruneConfig
    source: Path | None = None
    graph: Graph | None = None
    depth: DepthResult | None = None
    analysis: Analysis | None = None
    statistics: dict[str, LayerStatistics] | None = None
    calibration: str | None = None
    calibration_warning: str | None = None
    calibration_data: dict[str, np.ndarray] | None = None
    held_out: dict[str, np.ndarray] | None = None
    written: SelfWritten | None = None
    rotation: HeadRotation | None = None
    scores: dict[int, np.ndarray] | None = None
    order_choice: str | None = None  # which groups the sensitivity pass ordered by the criterion's alternative
    cost_exponent: float = COST_EXPONENT
    plan: Plan | None = None
    removed_by_axis: dict[int, np.ndarray] | None = None
    compensated: dict[str, np.ndarray] = field(default_factory=dict)
    model: onnx.ModelProto | None = None
    fidelity: Fidelity | None = None
    held_out_fidelity: Fidelity | None = None
    eval_before: float | None = None
    eval_after: float | None = None
    output: Path | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    report: PruneReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    progress: Progress | None = field(default=None, repr=False)

    @property
    def input_graph(self) -> Graph:
        """The model as it came in, before residual branches were removed or heads rotated."""
        if self.depth is not None:
            return self.depth.original
        return self.rotation.original if self.rotation is not None else self.graph

    def note(self, message: str) -> None:
        """Tell the user what is happening now (a progress line), if anyone listens."""
        if self.progress:
            self.progress(message)
