"""What a pruning run changed and bought, as a rich table or JSON for pipelines."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .config import TARGET_TOLERANCE
from .cost import CostModel
from .interface import interface_changes
from .known_text import SHIPPED
from .model_files import file_bytes
from .quantized import saturation, without_float_view
from .shapes import input_shape_option
from .subgraphs import control_flow_notes
from .verify import POOR_COSINE, Fidelity, custom_ops
from .versions import versions

if TYPE_CHECKING:
    from .state import PruneState

__all__ = [
    "GroupChange", "InitializerChange", "PruneReport", "initializer_changes", "build_report", "render_report", "render_analysis",
    "describe_fidelity",
]


@dataclass
class GroupChange:
    """One group's width before and after; ``kept`` lists the kept units (root channels, or heads)."""

    name: str
    kind: str
    channels_before: int
    channels_after: int
    blocked: int
    blocked_by: str | None
    kept: list[int] = field(default_factory=list)
    rounded_to: int | None = None  # rounding used when finer than --round-to's rule, to reach the target


@dataclass
class InitializerChange:
    """What became of one weight of the input model: ``kept[axis]`` lists the indices kept along
    each axis that lost some (the others are whole), ``compensated`` whether its remaining values
    were re-fitted or rotated (then the pruned file holds them, not a slice of the original)."""

    name: str
    shape: list[int]
    kept: dict[int, list[int]]
    compensated: bool = False


@dataclass
class PruneReport:
    input: str
    output: str
    criterion: str
    target_kind: str
    target_value: float
    scope: str
    round_to: int
    macs_before: float
    macs_after: float
    params_before: float
    params_after: float
    size_before: int
    size_after: int
    groups: list[GroupChange]
    barriers: list[str]
    fidelity: Any = None
    custom_ops: list[str] = field(default_factory=list)
    calibration: str | None = None
    calibration_warning: str | None = None  # why the --calib (or synthetic) samples describe one input, not many
    order_choice: str | None = None  # groups ordered by the criterion's alternative (sensitivity pass)
    landing_distortion: float | None = None  # past the tolerance: the plan closer to the target measured this many times more
    compensated: int = 0
    requantized: tuple[int, int] = (0, 0)  # re-fitted QDQ weights quantized again, values saturated
    integer_weights: int = 0  # weights read by MatMulInteger/ConvInteger (dynamic quantization) that have no
    # float view (no DynamicQuantizeLinear input, or no known scale): never compensated
    timings: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)  # peak resident memory when each pass ended
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    held_out_fidelity: Any = None
    eval_before: float | None = None
    eval_after: float | None = None
    control_flow: list[str] = field(default_factory=list)  # what became of each control-flow subgraph
    interface: list[str] = field(default_factory=list)  # graph inputs/outputs whose shapes changed (--allow-io-change)
    depth: list[str] = field(default_factory=list)  # residual branches removed (--depth, --units depth)
    rotated_heads: int = 0  # attention groups whose heads were given a new basis (head dims pruned)
    rotation_dropped: int = 0  # attention groups whose rotation changed the outputs (kept their basis)
    rotation_error: float = 0.0  # the largest relative output error a rotation checked gave
    initializers: list[InitializerChange] = field(default_factory=list)
    shipped_text: bool = False  # data-free statistics from the shipped sentences: distillation needs no --data
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # as --input-shape bound them

    @property
    def flops_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def latency_ratio(self) -> float | None:
        if self.latency_before_ms and self.latency_after_ms:
            return self.latency_after_ms / self.latency_before_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fidelity"] = asdict(self.fidelity) if self.fidelity is not None else None
        data["held_out_fidelity"] = asdict(self.held_out_fidelity) if self.held_out_fidelity is not None else None
        data.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio, latency_ratio=self.latency_ratio,
                    versions=versions())
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _ratio(before: float | None, after: float | None) -> str:
    return f"{after / before:.3f}" if before and after is not None else "-"


def short_name(name: str, width: int = 60) -> str:
    """``name`` as written, or, when longer than ``width``, its start and end around "...": an
    exporter that fuses ops joins their names (TensorFlow's ``a;a;b;b;...``, hundreds of characters)."""
    if len(name) <= width:
        return name
    head = (width - 3) // 3
    return f"{name[:head]}...{name[head + 3 - width:]}"


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def initializer_changes(state: PruneState) -> list[InitializerChange]:
    """Every initializer that lost indices or was re-fitted (or rotated), with the indices kept
    per axis (a QDQ weight re-fitted is reported by its quantized initializer)."""
    analysis, changes = state.analysis, []
    refitted = {state.graph.quantized[n].storage if n in state.graph.quantized else n for n in state.compensated}
    refitted |= state.rotation.rotated if state.rotation is not None else set()
    for name, value in state.graph.constants.items():
        if name in state.graph.quantized:
            continue  # not an initializer: the float value of one
        kept = {}
        for axis, size in enumerate(value.shape):
            axis_id = analysis.axis_id(name, axis)
            gone = state.removed_by_axis.get(axis_id) if axis_id is not None else None
            if gone is not None and gone.size:
                kept[axis] = np.setdiff1d(np.arange(size), gone).tolist()
        if kept or name in refitted:
            changes.append(InitializerChange(name, list(value.shape), kept, name in refitted))
    return changes


def build_report(state: PruneState) -> PruneReport:
    """The report of a finished run: costs before and after, per-group widths, fidelity."""
    analysis, plan, config = state.analysis, state.plan, state.config
    costs = {}
    for kind in ("flops", "params"):
        cost = CostModel(analysis, kind)
        before = cost.total
        for axis, indices in state.removed_by_axis.items():
            cost.remove({axis: len(indices)})
        costs[kind] = (state.depth.cost_before[kind] if state.depth else before, cost.total)
    groups = [
        GroupChange(
            name=g.name,
            kind=analysis.kind(g),
            channels_before=len(g.units),
            channels_after=len(g.units) - len(plan.removed.get(g.id, [])),
            blocked=len(g.units) - len(g.prunable),
            blocked_by=g.blocked_reasons[0] if g.blocked_reasons else None,
            rounded_to=plan.rounded_finer.get(g.id),
            kept=sorted(set(range(len(g.units))) - set(plan.removed.get(g.id, []))),
        )
        for g in analysis.groups
    ]
    target = config.target()
    return PruneReport(
        input=str(state.source),
        output=str(state.output),
        criterion=config.criterion_name,
        target_kind=target.kind,
        target_value=target.value,
        scope=config.scope,
        round_to=config.round_to,
        macs_before=costs["flops"][0],
        macs_after=costs["flops"][1],
        params_before=costs["params"][0],
        params_after=costs["params"][1],
        size_before=file_bytes(state.source),
        size_after=file_bytes(state.output),
        groups=groups,
        barriers=[f"{b.op_type} node '{b.node}': {b.reason}" for b in analysis.barriers],
        fidelity=state.fidelity,
        custom_ops=custom_ops(state.graph),
        calibration=state.calibration,
        calibration_warning=state.calibration_warning,
        order_choice=state.order_choice,
        landing_distortion=plan.landing_distortion,
        shipped_text=state.written is not None and state.written.data is not None and state.written.samples == SHIPPED,
        input_shapes=dict(config.input_shapes),
        compensated=len(state.compensated),
        rotated_heads=len(state.rotation.energies) if state.rotation is not None else 0,
        rotation_dropped=state.rotation.dropped if state.rotation is not None else 0,
        rotation_error=state.rotation.error if state.rotation is not None else 0.0,
        requantized=saturation(state.graph, state.compensated),
        integer_weights=len(without_float_view(state.graph)),
        timings=state.timings,
        peak_mb=state.peak_mb,
        latency_before_ms=state.latency_before_ms,
        latency_after_ms=state.latency_after_ms,
        held_out_fidelity=state.held_out_fidelity,
        eval_before=state.eval_before,
        eval_after=state.eval_after,
        control_flow=control_flow_notes(analysis),
        interface=[c.describe() for c in interface_changes(analysis, state.removed_by_axis)],
        depth=[f"{d} (distortion {e:.3g})" for d, e in zip(state.depth.removed, state.depth.distortions)] if state.depth else [],
        initializers=initializer_changes(state),
    )


def _files(report: PruneReport) -> str:
    """``input -> output`` by file name, or by path when the names are the same (the paths are
    in the JSON report): a path deep in site-packages would wrap the table's title."""
    source, output = Path(report.input), Path(report.output)
    if source.name == output.name:
        return f"{source} -> {output}"
    return f"{source.name} -> {output.name}"


def render_report(report: PruneReport, console: Console) -> None:
    table = Table(title=escape(f"spa-prune: {_files(report)}"))
    for column in ("", "before", "after", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("FLOPs (MACs)", _count(report.macs_before), _count(report.macs_after),
                  _ratio(report.macs_before, report.macs_after))
    table.add_row("parameters", _count(report.params_before), _count(report.params_after),
                  _ratio(report.params_before, report.params_after))
    table.add_row("file size", f"{report.size_before / 1e6:.2f} MB", f"{report.size_after / 1e6:.2f} MB",
                  _ratio(report.size_before, report.size_after))
    if report.latency_before_ms is not None:
        table.add_row("latency (ORT, 1 thread)", f"{report.latency_before_ms:.2f} ms",
                      f"{report.latency_after_ms:.2f} ms",
                      _ratio(report.latency_before_ms, report.latency_after_ms))
    console.print(table)
    pruned = sum(1 for g in report.groups if g.channels_after < g.channels_before)
    console.print(
        f"target --{report.target_kind} {report.target_value:g} ({report.scope}, round-to {report.round_to}, "
        f"criterion {report.criterion}): {pruned} of {len(report.groups)} groups pruned"
    )
    achieved = {"flops": report.flops_ratio, "params": report.params_ratio}.get(report.target_kind)
    if achieved is not None and achieved > report.target_value + 5e-4:
        console.print(
            f"reached {achieved:.3f}, above --{report.target_kind} {report.target_value:g} by less than the "
            f"tolerance {TARGET_TOLERANCE:g}: nothing more can go (--analyze shows what blocks the rest)"
        )
    if report.landing_distortion is not None:
        console.print(landing_note(report))
    if report.target_kind == "latency":
        console.print(
            f"measured latency ratio {report.latency_ratio:.3f} (onnxruntime, 1 thread, batch as bound; CPU time "
            f"of the inference thread, original and pruned model run in turns)"
        )
    if report.fidelity is not None:
        console.print("verified: onnx.checker full check, onnxruntime run; "
                      + describe_fidelity(report.fidelity, report.held_out_fidelity))
        if report.held_out_fidelity is not None:
            console.print(describe_fidelity(report.held_out_fidelity))
        warning = fidelity_warning(report)
        if warning:
            console.print(Text(warning, style="bold yellow"))
        elif synthetic_only(report):
            console.print(Text(SYNTHETIC_NOTE, style="dim"))
    elif report.custom_ops:
        console.print(
            f"verified with onnx.checker and shape inference only: onnxruntime cannot run "
            f"{', '.join(report.custom_ops)}, so outputs were not compared"
        )
    if report.eval_before is not None:
        console.print(f"--eval score: {report.eval_before:.4g} before, {report.eval_after:.4g} after")
    if report.calibration:
        compensated = "" if fidelity_only(report) else f"; {report.compensated} weight tensors compensated"
        console.print(escape(f"statistics: {report.calibration}{compensated}"))
    if report.order_choice:
        console.print(escape(f"channel order: {report.order_choice}"))
    if report.calibration_warning:
        console.print(Text(sameness_warning(report), style="bold yellow"))
    if report.rotated_heads:
        groups = "attention group" if report.rotated_heads == 1 else "attention groups"
        console.print(f"head dimensions: {report.rotated_heads} {groups} (queries/keys, values/outputs) "
                      "rotated first so that the pruned dimensions carry the least "
                      f"(outputs kept within {report.rotation_error:.1e}, relative)")
    if report.rotation_dropped:
        console.print(f"head dimensions: {report.rotation_dropped} attention group(s) keep their exported basis: "
                      f"rotating them changed the outputs (relative error {report.rotation_error:.2g})")
    if integer_note(report):
        console.print(escape(integer_note(report)))
    if report.requantized[0]:
        console.print(f"lossy: {report.requantized[0]} re-fitted weights quantized again with their original scales "
                      f"({report.requantized[1]} more values at the ends of the range the original weights span)")
    hidden = [g for g in report.groups if g.kind == "hidden" and g.channels_after < g.channels_before]
    if hidden:
        console.print(
            "lossy: the hidden size was pruned through LayerNorm ("
            + ", ".join(f"{g.channels_after}/{g.channels_before}" for g in hidden)
            + "); normalisation statistics change, so expect a larger output change"
        )
    finer = [g for g in report.groups if g.rounded_to is not None]
    if finer:
        console.print(escape(
            f"rounded finer than round-to {report.round_to} to reach the target: "
            + ", ".join(f"{short_name(g.name)} {g.channels_before} -> {g.channels_after} (multiples of {g.rounded_to})"
                       for g in finer)
        ))
    heads = [g for g in report.groups if g.kind == "heads"]
    if heads:
        console.print("attention heads kept per layer: " + ", ".join(f"{g.channels_after}/{g.channels_before}" for g in heads))
    if report.barriers:
        console.print(escape(f"barriers ({len(report.barriers)}): " + "; ".join(report.barriers[:5])))
    for note in report.control_flow:
        console.print(escape(f"control flow: {note}"))
    if report.depth:
        console.print(escape(f"residual branches removed ({len(report.depth)}): " + "; ".join(report.depth)))
        achieved = {"flops": report.flops_ratio, "params": report.params_ratio}.get(report.target_kind)
        if achieved is not None and achieved < report.target_value - TARGET_TOLERANCE:
            console.print(f"the branches alone took the {report.target_kind} to {achieved:.3f}, past "
                          f"--{report.target_kind} {report.target_value:g}, so no width was pruned; "
                          "fewer branches (--depth) leave more of the model")
    if report.interface:
        console.print(escape("interface changed (--allow-io-change): " + "; ".join(report.interface)))


def describe_fidelity(f: Fidelity, held_out: Fidelity | None = None) -> str:
    """One line of figures of the fidelity ``f``; none when no sample of it has outputs beyond
    round-off (``counted`` 0, set by the verification only beside ``held_out`` samples: both
    models' outputs all but zero next to theirs)."""
    if f.counted == 0:
        return (f"outputs vs original on {f.source} not compared: both models' outputs are all but zero there "
                f"({f.scale / held_out.scale:.2g} of their size on {held_out.source})")
    agreement = f", top-1 agreement {f.top1_agreement:.3f}" if f.top1_agreement is not None else ""
    optimiser = (f" (run without onnxruntime's graph optimisations, which change its outputs by {f.optimiser_change:.3g} "
                 "relative: an onnxruntime issue, not the pruning's)") if f.optimiser_change else ""
    counted = (f" over {f.counted} of {f.samples} samples (the other {f.samples - f.counted}: outputs all but zero in "
               "both models)") if f.counted is not None else ""
    return (f"outputs vs original on {f.source}: cosine {f.cosine:.4f}{counted}{agreement}, relative error "
            f"{f.relative_error:.3g}{optimiser}")


POOR_AGREEMENT = 0.9


def fidelity_warning(report: PruneReport) -> str | None:
    """A plain warning, with what to do, when the pruned model's outputs (or the user's metric)
    moved far from the original's: cosine or top-1 agreement under 0.9 on held-out samples
    (on synthetic inputs when there are none), or the --eval score down by more than 10%."""
    f = report.held_out_fidelity or report.fidelity
    poor = f is not None and (f.cosine < POOR_COSINE or (f.top1_agreement is not None and f.top1_agreement < POOR_AGREEMENT))
    if report.eval_before is not None and report.eval_after is not None:
        poor = report.eval_after < 0.9 * report.eval_before
    if not poor:
        return None
    advice = ["give real samples with --calib"] if data_free(report) or not report.calibration else []
    if fidelity_only(report):
        advice = ["let the --calib samples choose: drop --criterion, --allocation score and --refit 0"]
    if report.integer_weights:
        advice.insert(0, QUANTIZE_AFTER)
    # the shipped sentences serve distillation too, at the shapes the pruning bound
    data = "".join(f" {input_shape_option(name, shape)}" for name, shape in report.input_shapes.items()) \
        if report.shipped_text else " --data TRAIN.npz"
    advice += ["try a milder target", "or train it toward the original, no labels needed: spa-prune distill "
               f"{shlex.quote(report.output)} --teacher {shlex.quote(report.input)}{data}"]
    return f"warning: the pruned model's outputs differ markedly from the original's; {', '.join(advice)}"


QUANTIZE_AFTER = "prune the float model and quantize the pruned one (e.g. onnxruntime's quantize_dynamic)"
INTEGER_NOTE = (
    "quantized: {count} weights are read by integer products (MatMulInteger/ConvInteger, dynamic quantization) "
    "whose float inputs or scales were not found: ranked by their dequantized values, but neither compensated "
    f"nor re-fitted; for the float pipeline's accuracy, {QUANTIZE_AFTER}"
)
"""The note on dynamic weights the default pipeline cannot fit: those of an integer product
that does not read ``DynamicQuantizeLinear`` or is not rescaled by a known scale
(:func:`~spa_compiler.quantized.float_product`); the others are compensated and re-fitted in
floats and quantized again."""


def integer_note(report: PruneReport) -> str | None:
    """The dynamic-quantization note, when the run compensated weights and some it could not."""
    compensating = bool(report.calibration) and not fidelity_only(report)
    return INTEGER_NOTE.format(count=report.integer_weights) if report.integer_weights and compensating else None


SYNTHETIC_NOTE = (
    "note: this fidelity is on synthetic inputs, which can overstate it on real data; --calib measures it on "
    "held-out real samples, --eval FILE.py with your own metric"
)


FIDELITY_ONLY = "--calib measures fidelity only"
"""How ``calibration`` starts when the settings collect no statistics, so the ``--calib``
samples chose nothing (:class:`~spa_compiler.stages.HeldOutOnly`)."""


def fidelity_only(report: PruneReport) -> bool:
    """Whether the ``--calib`` samples measured fidelity and chose nothing."""
    return bool(report.calibration) and report.calibration.startswith(FIDELITY_ONLY)


def landing_note(report: PruneReport) -> str:
    """Why the plan goes past the target by more than the tolerance (``report.landing_distortion``)."""
    achieved = {"flops": report.flops_ratio, "params": report.params_ratio}.get(report.target_kind)
    reached = f"reached {achieved:.3f}, " if achieved is not None else ""
    times = report.landing_distortion
    cost = (f"{times:.1f} times this plan's measured output distortion" if times != float("inf")
            else "measured output distortion where this plan adds none")
    return (f"{reached}past --{report.target_kind} {report.target_value:g} by more than the tolerance "
            f"{TARGET_TOLERANCE:g}: the steps that would have come closer cost {cost}")


def sameness_warning(report: PruneReport) -> str:
    """The warning for samples that describe one input (``report.calibration_warning``): a
    ``--calib`` file's, or the synthetic ones of an input spa-prune cannot tell the content of
    (integers no embedding table reads: zeros)."""
    if data_free(report):
        return (f"warning: data-free, the synthetic samples describe one input ({report.calibration_warning}): "
                "spa-prune cannot tell what the model's inputs hold, so the channels were chosen for that input and "
                "the fidelity figures say nothing of real ones; give real samples with --calib")
    return (f"warning: the --calib data describes one input, not many ({report.calibration_warning}): the channels "
            "chosen and the weights re-fitted fit that input; give varied real samples, or none (data-free)")


def data_free(report: PruneReport) -> bool:
    """Whether the statistics came from synthetic inputs (no ``--calib``)."""
    return bool(report.calibration) and report.calibration.startswith("data-free")


def synthetic_only(report: PruneReport) -> bool:
    """Whether the report measured the pruned model on synthetic inputs only (no real held-out
    samples, no --eval score): those figures can stay high where real data suffers (data-free
    all-MiniLM-L6-v2 at --flops 0.5 keeps a cosine of 0.833 on real sentences; on 16 token-prior
    sequences it shows 0.91)."""
    real = report.held_out_fidelity is not None and not data_free(report)
    return report.fidelity is not None and not real and report.eval_before is None


def render_analysis(analysis, console: Console) -> None:
    """Print every group: its members, sizes, and what blocked which channels."""
    table = Table(title=f"{len(analysis.groups)} groups")
    for column in ("group", "units", "prunable", "members", "blocked by"):
        table.add_column(column)
    for group in analysis.groups:
        members = ", ".join(analysis.describe_axis(a) for a in group.axes[:4])
        if len(group.axes) > 4:
            members += f", ... ({len(group.axes)} axes)"
        table.add_row(escape(group.name), f"{len(group.units)} {analysis.kind(group)}", str(len(group.prunable)),
                      escape(members), escape("; ".join(group.blocked_reasons[:2]) or "-"))
    console.print(table)
    for barrier in analysis.barriers:
        console.print(escape(f"barrier: {barrier.op_type} node '{barrier.node}': {barrier.reason}"))
