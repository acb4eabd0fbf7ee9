"""Reports as files a pipeline can attach to a model card: ``report.md`` and pictures.

A single run (``--report DIR``) writes ``report.md`` (costs before and after, fidelity, the width
of every group before and after, what blocked what) and ``widths.png`` (per group, the share of
its channels kept). A sweep writes ``sweep.json`` (every figure of every point), ``report.md`` (a
table per criterion, the chosen points, what blocked what) and ``pareto.png`` (quality against
measured latency and against FLOPs, per criterion a line through its Pareto front, the unpruned
model marked).

*Quality* is the user's ``--eval`` score when given, else the cosine between the pruned and the
original outputs on held-out calibration samples when there are any, else on synthetic inputs.
The *chosen* point of a criterion is its fastest point (by measured latency, else FLOPs) whose
fidelity draws no warning (:func:`~spa_compiler.report.fidelity_warning`: cosine and top-1
agreement at least 0.9, or the ``--eval`` score within 10% of the original's); its *Pareto* points
are those no other point of the criterion beats on both speed and quality.

Pictures need matplotlib (the ``plots`` extra), imported only here and only when drawing, with the
headless Agg backend; without it the text files are written and the message says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .report import (
    PruneReport, _count, data_free, describe_fidelity, fidelity_warning, integer_note, landing_note, sameness_warning,
    short_name,
)

if TYPE_CHECKING:
    from .sweep import PointResult, SweepResult

__all__ = [
    "quality", "quality_label", "chosen_point", "pareto_points", "width_bars", "write_run_report", "write_sweep_report",
]

log = logging.getLogger(__name__)

PLOTS_HINT = "the pictures need matplotlib: pip install 'spa-prune[plots]'"


def quality(report: PruneReport) -> float | None:
    """The report's quality figure (see the module docstring)."""
    if report.eval_after is not None:
        return report.eval_after
    fidelity = report.held_out_fidelity or report.fidelity
    return fidelity.cosine if fidelity is not None else None


def quality_label(report: PruneReport) -> str:
    if report.eval_after is not None:
        return "--eval score"
    if report.held_out_fidelity is not None:
        return "output cosine (held-out synthetic samples)" if data_free(report) else "output cosine (held-out samples)"
    return "output cosine (synthetic inputs)"


def _speed(report: PruneReport) -> float:
    """Lower is faster: the measured latency ratio, else the FLOPs ratio."""
    return report.latency_ratio if report.latency_ratio is not None else report.flops_ratio


def pareto_points(results: list[PointResult], speed: Callable[[PruneReport], float] = _speed) -> list[PointResult]:
    """The finished points no other beats on both ``speed`` (lower is better) and quality (ties
    kept), fastest first."""
    done = [r for r in results if r.report is not None and quality(r.report) is not None]

    def beaten(r: PointResult) -> bool:
        s, q = speed(r.report), quality(r.report)
        return any(
            speed(o.report) <= s and quality(o.report) >= q and (speed(o.report) < s or quality(o.report) > q)
            for o in done
        )

    return sorted((r for r in done if not beaten(r)), key=lambda r: speed(r.report))


def chosen_point(results: list[PointResult]) -> PointResult | None:
    """The fastest finished point whose fidelity draws no warning."""
    fine = [r for r in results if r.report is not None and fidelity_warning(r.report) is None]
    return min(fine, key=lambda r: _speed(r.report), default=None)


# --------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _costs_table(report: PruneReport) -> list[str]:
    rows = [
        "| | before | after | ratio |", "|---|---:|---:|---:|",
        f"| FLOPs (MACs) | {_count(report.macs_before)} | {_count(report.macs_after)} | {report.flops_ratio:.3f} |",
        f"| parameters | {_count(report.params_before)} | {_count(report.params_after)} | {report.params_ratio:.3f} |",
        f"| file size | {report.size_before / 1e6:.2f} MB | {report.size_after / 1e6:.2f} MB | "
        f"{report.size_after / report.size_before:.3f} |",
    ]
    if report.latency_ratio is not None:
        rows.append(f"| latency (onnxruntime, 1 thread) | {report.latency_before_ms:.2f} ms | "
                    f"{report.latency_after_ms:.2f} ms | {report.latency_ratio:.3f} |")
    if report.eval_before is not None:
        rows.append(f"| --eval score | {report.eval_before:.4g} | {report.eval_after:.4g} | "
                    f"{_fmt(report.eval_after / report.eval_before if report.eval_before else None)} |")
    return rows


def _fidelity_lines(report: PruneReport) -> list[str]:
    lines = [f"- {describe_fidelity(f, report.held_out_fidelity if f is report.fidelity else None)}"
             for f in (report.fidelity, report.held_out_fidelity) if f is not None]
    warning = fidelity_warning(report)
    return lines + ([f"- **{warning}**"] if warning else [])


def _blocked_lines(report: PruneReport) -> list[str]:
    """What blocked what: groups with blocked channels, and the barriers."""
    lines = [f"- {g.name}: {g.blocked} of {g.channels_before} channels blocked by {g.blocked_by}"
             for g in report.groups if g.blocked]
    lines += [f"- barrier: {b}" for b in report.barriers]
    return lines or ["- nothing: every channel could be pruned"]


def _widths_table(report: PruneReport) -> list[str]:
    rows = ["| group | kind | before | after | kept |", "|---|---|---:|---:|---:|"]
    rows += [f"| {_cell(g.name)} | {g.kind} | {g.channels_before} | {g.channels_after} | "
             f"{g.channels_after / g.channels_before:.2f} |" for g in report.groups]
    return rows


def run_markdown(report: PruneReport, picture: str | None) -> str:
    lines = [
        f"# spa-prune: {Path(report.input).name}", "",
        f"Target --{report.target_kind} {report.target_value:g} ({report.scope}, round-to {report.round_to}, "
        f"criterion {report.criterion}); output `{report.output}`.", "",
        *_costs_table(report), "", *_fidelity_lines(report),
        *([f"- statistics: {report.calibration}"] if report.calibration else []),
        *([f"- {integer_note(report)}"] if integer_note(report) else []),
        *([f"- channel order: {report.order_choice}"] if report.order_choice else []),
        *([f"- {landing_note(report)}"] if report.landing_distortion is not None else []),
        *([f"- {sameness_warning(report)}"] if report.calibration_warning else []), "",
        "## Widths per group", "", *_widths_table(report), "",
        *([f"![widths per group]({picture})", ""] if picture else []),
        "## What blocked what", "", *_blocked_lines(report), "",
    ]
    return "\n".join(lines)


def _point_row(result: PointResult) -> str:
    report, point = result.report, result.point
    if report is None:
        return f"| {point.target_kind} {point.target_value:g} | failed: {_cell(result.error)} |" + " |" * 8
    held = report.held_out_fidelity
    fidelity = report.fidelity if report.fidelity is not None and report.fidelity.counted != 0 else None  # 0: not compared
    latency = (f"{report.latency_after_ms:.2f} ({report.latency_ratio:.3f})"
               if report.latency_ratio is not None else "-")
    return (
        f"| {point.target_kind} {point.target_value:g} | {report.flops_ratio:.3f} | {report.params_ratio:.3f} | "
        f"{report.size_after / 1e6:.2f} | {latency} | {_fmt(fidelity.cosine if fidelity else None, '{:.4f}')} | "
        f"{_fmt(fidelity.top1_agreement if fidelity else None)} | {_fmt(held.cosine if held else None, '{:.4f}')} | "
        f"{_fmt(report.eval_after, '{:.4g}')} | {result.seconds:.1f} |"
    )


def sweep_markdown(result: SweepResult, picture: str | None) -> str:
    done = [r.report for r in result.points if r.report is not None]
    first = done[0] if done else None
    lines = [f"# spa-prune sweep: {Path(result.model).name}", "",
             f"{len(result.points)} points ({sum(r.report is None for r in result.points)} failed), engine "
             f"{result.engine}, {result.wall_seconds:.1f} s in all; shared by every point: "
             + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.shared_timings.items()) + "."]
    if first is not None:
        befores = sorted(r.latency_before_ms for r in done if r.latency_before_ms is not None)
        latency = f", latency {befores[len(befores) // 2]:.2f} ms (median of the points' measurements)" if befores else ""
        lines += ["", f"Unpruned: {_count(first.macs_before)} MACs, {_count(first.params_before)} parameters, "
                  f"{first.size_before / 1e6:.2f} MB{latency}"
                  + (f", --eval score {result.eval_before:.4g}" if result.eval_before is not None else "") + "."]
    if picture:
        lines += ["", f"![quality against latency and FLOPs]({picture})"]
    header = ("| target | FLOPs | params | size MB | latency ms (ratio) | cosine | top-1 | held-out cosine | "
              "--eval | seconds |")
    for criterion in dict.fromkeys(r.point.criterion for r in result.points):
        rows = [r for r in result.points if r.point.criterion == criterion]
        once = result.criterion_timings.get(criterion, {})
        lines += ["", f"## Criterion {criterion}", ""]
        if once:
            lines += ["Once for its points: " + ", ".join(f"{n} {t:.2f} s" for n, t in once.items()) + ".", ""]
        lines += [header, "|---" + "|---:" * 9 + "|", *map(_point_row, rows)]
    lines += ["", "## Chosen points", "",
              "The fastest point whose fidelity draws no warning, and the points no other beats on both speed "
              "and quality (speed: measured latency, else FLOPs).", ""]
    for criterion in dict.fromkeys(r.point.criterion for r in result.points):
        rows = [r for r in result.points if r.point.criterion == criterion]
        chosen = chosen_point(rows)
        pareto = ", ".join(r.point.label for r in pareto_points(rows)) or "none"
        lines.append(f"- {criterion}: chosen {chosen.point.label if chosen else 'none (every point draws a warning)'}"
                     f"; Pareto: {pareto}")
    lines += ["", "## What blocked what", "", *(_blocked_lines(first) if first else ["- no point finished"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def width_bars(report: PruneReport) -> list[tuple[str, float, str, bool]]:
    """Per group, what its bar in ``widths.png`` shows: its name, the share of its channels
    (units) kept ``after / before``, that count as text, and whether all of them are blocked."""
    return [(short_name(g.name, 48), g.channels_after / g.channels_before, f"{g.channels_after}/{g.channels_before}",
             g.blocked >= g.channels_before) for g in report.groups if g.channels_before]


def plot_widths(report: PruneReport, path: Path) -> None:
    """Horizontal bars per group: the share of its channels kept (dark; grey when every channel
    is blocked), on a light bar of the whole group, each labelled ``after/before``. Shares, not
    counts: one wide group (a classifier over thousands of classes) would flatten the others."""
    plt = _pyplot()
    bars = width_bars(report)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.22 * len(bars)))
    positions = range(len(bars))
    axes.barh(positions, [1.0] * len(bars), color="#c8d3e0", label="removed")
    for blocked, color, label in ((False, "#2b5d8c", "kept"), (True, "#9a9a9a", "blocked (kept whole)")):
        rows = [(position, share) for position, (_, share, _, whole) in zip(positions, bars) if whole == blocked]
        if rows:
            axes.barh(*zip(*rows), color=color, label=label)
    for position, (_, _, count, _) in zip(positions, bars):
        axes.text(1.01, position, count, va="center", fontsize=7)
    axes.set_yticks(list(positions), [name for name, *_ in bars], fontsize=7)
    axes.set_xlim(0, 1.2)
    axes.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.invert_yaxis()
    axes.set_xlabel("share of the group's channels (units) kept; right: kept/before")
    target = f"--{report.target_kind} {report.target_value:g}"
    axes.set_title(f"{Path(report.input).name}: {target} ({report.criterion})", pad=18)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(result: SweepResult, path: Path) -> None:
    """Quality against the measured latency ratio (left) and the FLOPs ratio (right): per criterion
    a line through its Pareto front, its other points as open circles, each labelled by its target."""
    plt = _pyplot()
    done = [r for r in result.points if r.report is not None and quality(r.report) is not None]
    if not done:
        raise ValueError("no point finished with a quality figure")
    label = quality_label(done[0].report)
    unpruned_quality = result.eval_before if done[0].report.eval_after is not None else 1.0
    has_latency = all(r.report.latency_ratio is not None for r in done)
    panels = [("latency_ratio", "measured latency / unpruned (onnxruntime, 1 thread)")] if has_latency else []
    panels.append(("flops_ratio", "FLOPs / unpruned"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (attribute, xlabel) in zip(axes[0], panels):
        for criterion in dict.fromkeys(r.point.criterion for r in done):
            rows = [r for r in done if r.point.criterion == criterion]
            front = pareto_points(rows, lambda report: getattr(report, attribute))
            line, = ax.plot([getattr(r.report, attribute) for r in front], [quality(r.report) for r in front],
                            marker="o", label=f"{criterion} (Pareto front)")
            others = [r for r in rows if r not in front]
            ax.plot([getattr(r.report, attribute) for r in others], [quality(r.report) for r in others],
                    marker="o", markerfacecolor="none", linestyle="none", color=line.get_color())
            for r in rows:
                ax.annotate(f"{r.point.target_value:g}", (getattr(r.report, attribute), quality(r.report)),
                            textcoords="offset points", xytext=(4, -10), fontsize=7, color=line.get_color())
        ax.plot([1.0], [unpruned_quality], marker="*", markersize=14, color="black", linestyle="none", label="unpruned")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    kind = done[0].point.target_kind
    figure.suptitle(f"{Path(result.model).name}: sweep over --{kind} (labels), {result.engine}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw(draw, *args) -> bool:
    try:
        draw(*args)
    except ImportError:
        return False
    return True


def write_run_report(report: PruneReport, directory: Path) -> str | None:
    """``report.md`` and ``widths.png`` in ``directory``; a note when the picture could not be drawn."""
    directory.mkdir(parents=True, exist_ok=True)
    drawn = _draw(plot_widths, report, directory / "widths.png")
    (directory / "report.md").write_text(run_markdown(report, "widths.png" if drawn else None))
    return None if drawn else PLOTS_HINT


def write_sweep_report(result: SweepResult, directory: Path) -> str | None:
    """``sweep.json``, ``report.md`` and ``pareto.png`` in ``directory``; a note when the picture
    could not be drawn (no matplotlib, or no point finished)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    note = None
    try:
        drawn = _draw(plot_pareto, result, directory / "pareto.png")
        note = None if drawn else PLOTS_HINT
    except ValueError as exc:
        drawn, note = False, f"no pareto.png: {exc}"
    (directory / "report.md").write_text(sweep_markdown(result, "pareto.png" if drawn else None))
    return note
