"""The stages of the default pipeline, each a :class:`~spa_compiler.pipeline.Pass`.

In memory: :class:`Analyse`, :class:`CollectStatistics`, :class:`Score`, :class:`Allocate`,
:class:`Rewrite`, :class:`Verify` (a criterion that re-fits weights brings its own compensation
pass, run between allocation and rewriting). Around them for files: :class:`Load`,
:class:`Save`, :class:`MeasureLatency`, :class:`BuildReport`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .allocate import Constraints, Plan, Target, allocate
from .analysis import Analysis, analyze_graph
from .bench import measure_latency
from .batch_axis import activations, fixed_batch, samples_per_run
from .calibrate import (
    MAX_FEATURES, ConsumerLayer, LayerStatistics, array_shapes, collect_statistics, consumer_layers, load_calibration,
    sameness,
)
from .config import TARGET_TOLERANCE, PruneConfig
from .cost import CostMetric, CostModel
from .criteria import Criterion, ScoreContext, comparable_scores
from .errors import ModelError, TargetError
from .interface import interface_changes, narrow as narrow_io, narrow_all, resize_declarations
from .errors import first_line
from .attention_heads import rotatable_heads
from .ir import Graph, load_model, reattach_outputs
from .shapes import dims_text, synthetic_inputs, with_free_axes
from .model_files import save_model
from .pipeline import Pass
from .report import FIDELITY_ONLY, build_report
from .rewrite import expected_shapes, removed_indices, rewrite_model
from .self_written import SelfWritten, written_once
from .state import PruneState
from .synthetic import picture_values, synthetic_calibration, waveform_values
from .synthetic_tokens import embedding_table
from .token_augment import MORE_SEQUENCES, first_sequences, tokens_wanted, with_token_copies
from .verify import SILENT, custom_ops, held_out_fidelity, require_runnable, verify_model

__all__ = [
    "Load", "Analyse", "CollectStatistics", "HeldOutOnly", "Score", "Allocate", "Rewrite", "Verify", "RestoreOutputs",
    "Save", "MeasureLatency", "BuildReport",
]

log = logging.getLogger(__name__)


class Load(Pass):
    """Read ``state.source``, fold constants and bind the dynamic dimensions (``--input-shape``,
    else the ``--calib`` arrays' shapes, else a batch of one). A model of 64 MB of
    weights or more keeps them on disk (``load_model(lean=True)``): write the pruned
    ``state.model`` with :class:`Save` or :func:`~spa_compiler.model_files.save_model`."""

    name, description, requires, provides = "load", "loading the model", ("source",), ("graph",)

    def run(self, state: PruneState) -> PruneState:
        config = state.config
        data_shapes = array_shapes(config.calibration) if config.calibration else None
        state.graph = load_model(state.source, config.input_shapes, lean=True, data_shapes=data_shapes)
        return state


def blocked_summary(analysis: Analysis) -> str:
    """The three most common reasons channels are blocked, for messages."""
    reasons = Counter(u.blocked_by for g in analysis.groups for u in g.units if u.blocked_by)
    reasons.update(f"{b.op_type} node '{b.node}': {b.reason}" for b in analysis.barriers)
    return "; ".join(reason for reason, _ in reasons.most_common(3))


class Analyse(Pass):
    """Couple channels across the graph into groups; fail when nothing can be pruned.

    Attention loses whole heads (``head_dims`` False), head dimensions (True), or, by default
    (None), head dimensions when the run collects statistics (onnxruntime runs the model) and
    every attention group's heads can be rotated first (:mod:`spa_compiler.head_rotation`),
    whole heads otherwise: on all-MiniLM-L6-v2 rotated head dimensions keep more than whole
    heads at every target."""

    name, description, requires, provides = "analyse", "analysing channel dependencies", ("graph",), ("analysis",)

    def run(self, state: PruneState) -> PruneState:
        config = state.config
        analyse = partial(analyze_graph, state.graph, config.exclude, config.prune_hidden,
                          allow_io_change=config.allow_io_change)
        analysis = analyse(head_dims=bool(config.head_dims))
        rotatable = config.needs_statistics and not custom_ops(state.graph)
        if config.head_dims is None and rotatable and any(analysis.kind(g) == "heads" for g in analysis.groups):
            dims = analyse(head_dims=True)
            attention = [g for g in dims.groups if dims.kind(g) == "head dims"]
            if attention and len(rotatable_heads(dims)) == len(attention):
                analysis = dims
        if not any(g.prunable for g in analysis.groups):
            hidden = not config.prune_hidden and any(
                g.prunable for g in analyze_graph(state.graph, config.exclude, True, allow_io_change=config.allow_io_change).groups)
            hint = ("; its channels are normalised over together (LayerNorm): --prune-hidden prunes them "
                    "all the same, lossy" if hidden else "")
            why = f"blocked by: {blocked_summary(analysis)}" if analysis.groups else \
                "it has no layer with weight channels to remove (Conv, Gemm or MatMul with a constant weight, RNN/GRU/LSTM)"
            raise TargetError(f"nothing in this model can be pruned; {why}{hint}")
        state.analysis = analysis
        return state


class CollectStatistics(Pass):
    """Input statistics of every consumer layer, from ``--calib`` or seeded synthetic inputs; none
    (empty) when onnxruntime cannot run the model's custom ops. A model onnxruntime cannot run on
    the verification's inputs, or whose layer inputs are not finite on the samples, stops the
    run with a :class:`ModelError` saying so."""

    name, description = "calibrate", "collecting layer statistics"
    requires, provides = ("graph", "analysis"), ("statistics", "calibration", "calibration_data")

    def run(self, state: PruneState) -> PruneState:
        config, graph = state.config, state.graph
        unrunnable = custom_ops(graph)
        if unrunnable:
            state.statistics, state.calibration_data = {}, {}
            state.calibration = f"none: onnxruntime cannot run {', '.join(unrunnable)}, so scores are magnitudes"
            return state
        if config.verify:  # its inputs are the verification's: a failure now would be one then
            require_runnable(graph)
        layers = consumer_layers(state.analysis)
        wide = [layer.node for layer in layers if layer.features(graph) > MAX_FEATURES]
        layers = [layer for layer in layers if layer.node not in wide]
        if config.calibration:
            data, source = self._from_file(state, layers)
        else:
            data, source = self._data_free(state, layers)

        def report(done: int, total: int) -> None:
            state.note(f"collecting statistics of {len(layers)} layers: {done}/{total} samples")

        try:
            state.statistics = self.collect(graph, layers, data, state.config, report)
        except InvalidArgument as exc:  # the inputs' sample axes are none (sizes fixed otherwise)
            state.statistics, state.calibration_data, state.held_out = {}, {}, None
            state.calibration = (f"none: the model does not run on batches of its samples ({first_line(exc)}); "
                                 "scores are magnitudes")
            return state
        _require_finite(state.statistics, "its calibration samples" if config.calibration else "synthetic samples")
        if wide:
            named = ", ".join(wide[:3]) + (", ..." if len(wide) > 3 else "")
            one = len(wide) == 1
            source += (f"; none for {len(wide)} layer{'' if one else 's'} reading over {MAX_FEATURES} features "
                       f"({named}): {'its' if one else 'their'} input channels are scored by magnitude")
        state.calibration, state.calibration_data = source, data
        return state

    @classmethod
    def _data_free(cls, state: PruneState, layers: list[ConsumerLayer]) -> tuple[dict[str, np.ndarray], str]:
        """Synthetic samples (:mod:`.synthetic`), or text in their place: English sentences for a
        vocabulary spa-prune recognises (:mod:`.known_text`), else a causal language model's
        samples rewritten into text of its own (:mod:`.self_written`); of text an eighth is held
        out to measure fidelity on, like a file's, and the rest topped up with copies like a
        file's. Returns the samples and their description."""
        config, graph = state.config, state.graph
        tokens = any(embedding_table(graph, name) is not None for name in graph.inputs)
        samples = config.samples_for(synthetic_tokens=tokens, picture_values=picture_values(graph),
                                     waveform_values=waveform_values(graph))
        data, source = synthetic_calibration(graph, samples, config.seed)
        written = written_once(state, state.analysis, data) if tokens else SelfWritten(None, "")
        if written.data is None:
            state.calibration_warning = sameness(data)  # an input of unknown content: zeros
            state.held_out = synthetic_calibration(graph, HELD_OUT_SYNTHETIC, config.seed + 1)[0]
            return data, source + (f"; {written.note}" if written.note else "")
        data, state.held_out = split_held_out(written.data)
        held = f", {len(next(iter(state.held_out.values())))} of them held out to measure fidelity" if state.held_out else ""
        return cls._topped_up(state, layers, data, written.note + held)

    @classmethod
    def _from_file(cls, state: PruneState, layers: list[ConsumerLayer]) -> tuple[dict[str, np.ndarray], str]:
        """The ``--calib`` samples the statistics use (the held-out ones set aside in ``state``) and
        their description: a token model short of real tokens reads more of a larger file when
        the user did not say how many samples, then tops up with copies (:mod:`.token_augment`)."""
        config, graph = state.config, state.graph
        wanted = tokens_wanted(graph, layers) if config.token_copies else 0
        more = MORE_SEQUENCES if wanted and config.calibration_samples is None else 1
        loaded = load_calibration(config.calibration, graph, more * config.samples_for())
        state.calibration_warning = sameness(loaded)
        data, state.held_out = split_held_out(loaded)
        if more > 1:
            data = first_sequences(graph, data, wanted, config.samples_for())
        count, notes = len(next(iter(data.values()))), []
        if count > config.samples_for():
            notes.append(f"more than the default {config.samples_for()}: the widest layer wants {wanted} real tokens")
        if state.held_out:
            notes.append(f"{len(next(iter(state.held_out.values())))} more held out to measure fidelity")
        if bound := shapes_bound(graph, config):
            notes.append(bound)
        source = f"{count} samples from {config.calibration}" + (f" ({'; '.join(notes)})" if notes else "")
        return cls._topped_up(state, layers, data, source)

    @staticmethod
    def _topped_up(state: PruneState, layers: list[ConsumerLayer], data: dict[str, np.ndarray],
                   source: str) -> tuple[dict[str, np.ndarray], str]:
        """Token sequences too few for the widest layer on tokens, followed by copies with
        replaced tokens (:mod:`.token_augment`); other data as it is."""
        wanted = tokens_wanted(state.graph, layers) if state.config.token_copies else 0
        if not wanted:
            return data, source
        topped = with_token_copies(state.graph, data, wanted, state.config.seed)
        return topped.data, source + topped.note

    def collect(self, graph: Graph, layers: list[ConsumerLayer], data: dict[str, np.ndarray], config: PruneConfig,
                progress: Callable[[int, int], None]) -> dict[str, LayerStatistics]:
        """The layers' statistics over ``data``, in this process (a subclass may spread the work)."""
        return collect_statistics(graph, layers, data, config.calibration_batch, seed=config.seed, progress=progress)


def _require_finite(statistics: dict[str, LayerStatistics], samples: str) -> None:
    """Raise :class:`ModelError` when a layer's inputs were not finite on ``samples``: every
    statistic taken from them (scores, compensation, re-fit) would be NaN."""
    unusable = [node for node, stats in statistics.items() if not np.isfinite(stats.hessian).all()]
    if unusable:
        more = f" and {len(unusable) - 1} more layers" if len(unusable) > 1 else ""
        raise ModelError(
            f"the input model's activations are not finite (inf or NaN) on {samples} (the input of "
            f"'{unusable[0]}'{more}), so no statistics can be taken from them: prune by the weights alone "
            "(--criterion l2 --allocation score --refit 0), or calibrate (--calib) on samples the model computes finitely"
        )


def shapes_bound(graph: Graph, config: PruneConfig) -> str:
    """What the ``--calib`` arrays' shapes bound (the inputs with free axes after the batch that
    ``--input-shape`` left free), for the report; "" when nothing."""
    bound = [name for name in graph.inputs if name in with_free_axes(graph.model) and name not in config.input_shapes]
    return "their shapes bind " + ", ".join(f"{name}={dims_text(graph.input_shapes[name])}" for name in bound) if bound else ""


class HeldOutOnly(Pass):
    """``--calib`` under settings that collect no statistics (a magnitude criterion, score
    allocation, no re-fit): the file is read and checked as the statistics would read it, and
    up to :data:`HELD_OUT_MAX` of its samples measure the pruned model's fidelity, so the data
    given is not silently ignored; the report says it chose nothing."""

    name, description = "held-out", "reading held-out samples"
    requires, provides = ("graph",), ("calibration", "held_out")

    def run(self, state: PruneState) -> PruneState:
        config = state.config
        if custom_ops(state.graph):
            return state
        loaded = load_calibration(config.calibration, state.graph, HELD_OUT_MAX)
        state.calibration_warning = sameness(loaded)
        state.held_out = loaded
        count = len(next(iter(loaded.values())))
        bound = shapes_bound(state.graph, config)
        bound = f"; {bound}" if bound else ""
        state.calibration = (f"{FIDELITY_ONLY} ({count} samples from {config.calibration}{bound}): --criterion "
                             f"{config.criterion_name} with --allocation score and --refit 0 uses no statistics")
        return state


HELD_OUT_SHARE, HELD_OUT_MAX = 8, 32
HELD_OUT_SYNTHETIC, HELD_OUT_SYNTHETIC_SOURCE = 16, "synthetic samples the statistics did not see"
"""Synthetic samples made, data-free, to measure fidelity on: like the statistics' (token ids
from the vocabulary's prior, natural-image-like pictures), another seed, and more of them than
the report's first figure runs (one sample; standard-normal floats, where an image model's
statistics saw pictures)."""


def split_held_out(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Keep the last eighth of the calibration samples (at most 32) aside for measuring fidelity
    on real data; fewer than 16 samples are all used for statistics."""
    count = len(next(iter(data.values())))
    held = min(count // HELD_OUT_SHARE, HELD_OUT_MAX) if count >= 2 * HELD_OUT_SHARE else 0
    if not held:
        return data, None
    return {k: v[:-held] for k, v in data.items()}, {k: v[-held:] for k, v in data.items()}


class Score(Pass):
    """One score per unit of every group (higher = keep), comparable across groups."""

    name, requires, provides = "score", ("analysis",), ("scores",)

    def __init__(self, criterion: Criterion) -> None:
        self.criterion = criterion
        self.description = f"scoring channels with '{criterion.name}'"

    def run(self, state: PruneState) -> PruneState:
        """A self-normalised criterion's scores are used as they are; a group it cannot score
        (no consumer layer with statistics) takes its fallback criterion's comparable scores, or
        a rotated query/key group its unit energies, rescaled to the median of the scored
        groups' mean score."""
        criterion, analysis = self.criterion, state.analysis
        context = ScoreContext(analysis, state.config.seed, state.statistics or {})
        if not criterion.self_normalized:
            state.scores = {g.id: comparable_scores(g, criterion.score(g, context), context) for g in analysis.groups}
            return state
        scores, unscored = {}, []
        for group in analysis.groups:
            if context.statistics_for(group):
                scores[group.id] = np.asarray(criterion.score(group, context), dtype=np.float64)
            else:
                unscored.append(group)
        if unscored:
            energies = state.rotation.energies if state.rotation is not None else {}
            fallback, scale = criterion.fallback(), float(np.median([s.mean() for s in scores.values()] or [1.0]))
            for group in unscored:
                raw = energies.get(group.id)
                if raw is None:
                    raw = comparable_scores(group, fallback.score(group, context), context)
                scores[group.id] = raw * scale / (raw.mean() or 1.0)
        state.scores = scores
        return state


def check_reachable(analysis: Analysis, target: Target, plan: Plan, constraints: Constraints, metric: CostMetric) -> None:
    """Raise a TargetError explaining why, when the plan misses the target by more than the
    tolerance: the share of cost no pruning can touch (rounding is never the reason: allocation
    rounds groups finer until the target is met or nothing is left to remove)."""
    if target.kind == "ratio" or plan.achieved <= target.value + TARGET_TOLERANCE:
        return
    cost = CostModel(analysis, metric)
    prunable_axes = {a for g in analysis.groups for u in g.units if not u.blocked for a in u.members}
    fixed = sum(v for t, v in zip(cost.terms, cost.values) if not prunable_axes.intersection(t.axes))
    blocked = blocked_summary(analysis)
    reasons = [
        f"{fixed / cost.original_total:.0%} of the {metric.label} are in layers whose channels cannot be pruned"
        + (f" (blocked by: {blocked})" if blocked else "")
    ]
    tied = [g for g in analysis.groups if analysis.kind(g) == "heads" and len(g.units) == 1]
    if tied:
        reasons.append(f"the heads of {len(tied)} attention groups leave only all together ({tied[0].name}, ...): "
                       "--head-dims prunes their head dimensions instead")
    reasons.append(f"every group keeps at least {constraints.min_keep:g} of its channels (--min-keep)")
    raise TargetError(
        f"cannot reach --{target.kind} {target.value:g}: the best reachable is {plan.achieved:.3f}; "
        + "; ".join(reasons)
    )


class Allocate(Pass):
    """Choose the units to remove to meet the target, and the indices leaving every axis."""

    name, description = "allocate", "allocating the target"
    requires, provides = ("analysis", "scores"), ("plan", "removed_by_axis")

    def run(self, state: PruneState) -> PruneState:
        config = state.config
        target, constraints, metric = config.target(), config.constraints(), config.metric()
        if state.depth is not None:  # the target counts the original model's cost
            if target.value >= state.depth.kept:
                state.plan, state.removed_by_axis = Plan(achieved=1.0), {}
                return state
            target = Target(target.kind, target.value / state.depth.kept)
        plan = allocate(state.analysis, state.scores, target, constraints, metric, TARGET_TOLERANCE, state.cost_exponent)
        check_reachable(state.analysis, target, plan, constraints, metric)
        state.plan = plan
        state.removed_by_axis = removed_indices(state.analysis, plan.removed)
        return state


class Rewrite(Pass):
    """Emit the smaller dense model: constants sliced (re-fitted ones where compensated),
    attributes and shape constants fixed by the op rules."""

    name, description = "rewrite", "rewriting the model"
    requires, provides = ("analysis", "removed_by_axis"), ("model",)

    def run(self, state: PruneState) -> PruneState:
        analysis = state.analysis
        state.model = rewrite_model(analysis, state.removed_by_axis, state.compensated)
        resize_declarations(state.model, interface_changes(analysis, state.removed_by_axis))
        lossy = [g.name for g in analysis.groups if analysis.kind(g) == "hidden" and state.plan.removed.get(g.id)]
        if lossy:
            log.warning("hidden size pruned through LayerNorm in %d groups: lossy by design", len(lossy))
        return state


def _held_out_source(state: PruneState) -> str:
    """What the held-out samples are: the user's, data-free text (sequences the model wrote,
    shipped sentences), or synthetic."""
    if state.config.calibration:
        return "held-out calibration samples" if state.config.needs_statistics else "--calib samples"
    if state.written is not None and state.written.data is not None:
        return f"{state.written.samples} that the statistics did not see"
    return HELD_OUT_SYNTHETIC_SOURCE


class Verify(Pass):
    """The checker, the predicted shapes, an onnxruntime run, and the fidelity figures: on
    synthetic inputs, and on held-out calibration samples when the user gave data."""

    name, description = "verify", "verifying with onnx.checker and onnxruntime"
    requires = ("graph", "analysis", "removed_by_axis", "model")  # fidelity stays None for custom ops

    def run(self, state: PruneState) -> PruneState:
        shapes = expected_shapes(state.analysis, state.removed_by_axis)
        narrow = partial(narrow_io, state.analysis, state.removed_by_axis)
        original = state.input_graph  # fidelity to the input model
        state.fidelity = verify_model(state.graph, state.model, shapes, state.config.seed, narrow, original)
        if state.held_out is not None and state.fidelity is not None:
            batch = samples_per_run(state.graph, state.config.calibration_batch, activations(state.graph))
            held = held_out_fidelity(original, state.model, state.held_out, batch, narrow, _held_out_source(state),
                                     fixed_batch(state.graph))
            if state.fidelity.scale < SILENT * held.scale:  # both models' outputs there all but zero: nothing to compare
                state.fidelity = replace(state.fidelity, counted=0)
            state.held_out_fidelity = held
        return state


class RestoreOutputs(Pass):
    """Put the graph outputs that are not tensors (a ZipMap's maps), set aside while the model
    was pruned and measured (:func:`~spa_compiler.ir.detach_non_tensor_outputs`), back into the
    pruned model: its interface is the input model's."""

    name, description = "restore", "restoring the outputs that are not tensors"
    requires = ("graph", "model")

    def run(self, state: PruneState) -> PruneState:
        reattach_outputs(state.model, state.graph.detached_outputs)
        return state


class Save(Pass):
    """Write the pruned model atomically (external data when the input had it)."""

    name, requires, provides = "save", ("graph", "model"), ("output",)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"writing {self.path}"

    def run(self, state: PruneState) -> PruneState:
        state.output = save_model(state.model, self.path, external_data=state.graph.uses_external_data)
        return state


class MeasureLatency(Pass):
    """onnxruntime latency before and after (one thread), unless ``bench_runs`` is 0, the
    model has custom ops onnxruntime cannot run, or an earlier pass measured it (a ``latency``
    target's allocation, whose measurement the report then shows)."""

    name, description = "latency", "measuring onnxruntime latency (1 thread, batch as bound)"
    requires = ("graph", "model")

    def run(self, state: PruneState) -> PruneState:
        config, graph = state.config, state.graph
        if config.bench_runs and not custom_ops(graph) and state.latency_after_ms is None:
            feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, config.seed)
            original = state.input_graph
            state.latency_before_ms = measure_latency(original.model, feeds, config.bench_runs)
            narrowed = narrow_all(state.analysis, state.removed_by_axis, feeds) if state.removed_by_axis else feeds
            state.latency_after_ms = measure_latency(state.model, narrowed, config.bench_runs)
        return state


class BuildReport(Pass):
    """What changed and what it bought (see :mod:`spa_compiler.report`)."""

    name, description = "report", "building the report"
    requires, provides = ("source", "output", "analysis", "plan"), ("report",)

    def run(self, state: PruneState) -> PruneState:
        state.report = build_report(state)
        return state
