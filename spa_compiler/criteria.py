"""The criterion registry and what a criterion may read.

A criterion scores every unit (channel) of a group; higher means keep. The built-in criteria
live in :mod:`spa_compiler.passes` and register when first asked for; an installed package adds
its own through the ``spa_prune.criteria`` entry-point group, and Python code by calling
:func:`register_criterion`::

    from spa_compiler import Criterion, register_criterion

    @register_criterion("l1_out")
    class L1Out(Criterion):
        def score(self, group, ctx):
            return ctx.per_unit(group, "weight", lambda slab: np.abs(slab).sum(axis=1))

Scores from different groups are made comparable by :func:`normalize`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .analysis import Analysis, Group
from .calibrate import LayerStatistics
from .errors import InputError
from .plugins import load_entry_points, register_named

if TYPE_CHECKING:
    from .pipeline import PassLike

__all__ = [
    "Criterion",
    "ScoreContext",
    "register_criterion",
    "get_criterion",
    "available_criteria",
    "normalize",
    "comparable_scores",
]


_CRITERIA: dict[str, type["Criterion"]] = {}
_BLOCK_ELEMENTS = 1 << 22  # weights converted to float64 at a time when scoring (32 MB)


@dataclass
class ScoreContext:
    """What a criterion may read: the analysis (weights, groups), a seeded generator, and for
    criteria that need them the input statistics of consumer layers by node name."""

    analysis: Analysis
    seed: int = 0
    statistics: dict[str, LayerStatistics] = field(default_factory=dict)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def all_statistics(self) -> list[tuple[int, LayerStatistics]]:
        """``(axis id of the weight axis reading channels, statistics)`` of every consumer layer."""
        return [(self.analysis.axis_id(s.layer.weight, s.layer.axis), s) for s in self.statistics.values()]

    def statistics_for(self, group: Group) -> list[tuple[int, LayerStatistics]]:
        """The consumer layers that read this group's channels."""
        members = set(group.axes)
        return [(axis, stats) for axis, stats in self.all_statistics() if axis in members]

    def per_unit(
        self, group: Group, tag: str, per_index: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """Sum, over the group's constant axes tagged ``tag``, of ``per_index(slabs)`` per unit.

        For a tagged axis k of constant W (dequantized when stored as integers), ``slabs`` is W
        with axis k moved first and the rest flattened (``[size_k, -1]``); ``per_index`` returns
        one number per index of axis k, and a unit's score adds those of all the indices it
        occupies. Slabs are converted to float64 a block of indices at a time, so a weight costs
        little more than its own memory (a memory-mapped one, :mod:`spa_compiler.streaming`, no
        more than a block).
        """
        totals = np.zeros(len(group.units))
        graph = self.analysis.graph
        by_axis = group.by_axis()
        for axis_id in self.analysis.tagged(group, tag):
            ref = self.analysis.axes[axis_id]
            slabs = np.moveaxis(graph.float_value(ref.tensor), ref.axis, 0).reshape(ref.size, -1)
            step = max(1, _BLOCK_ELEMENTS // max(slabs.shape[1], 1))
            values = np.concatenate([
                np.asarray(per_index(slabs[start:start + step].astype(np.float64)), dtype=np.float64)
                for start in range(0, len(slabs), step)
            ])
            units, indices = by_axis[axis_id]
            totals += np.bincount(units, weights=values[indices], minlength=len(group.units))
        return totals

    def weights_owned(self, group: Group) -> np.ndarray:
        """How many weights each unit owns: its slabs on the group's "weight" axes."""
        totals = np.zeros(len(group.units))
        by_axis = group.by_axis()
        for axis_id in self.analysis.tagged(group, "weight"):
            ref = self.analysis.axes[axis_id]
            slab = self.analysis.graph.constants[ref.tensor].size // ref.size
            totals += slab * np.bincount(by_axis[axis_id][0], minlength=len(group.units))
        return totals

    def has_tag(self, group: Group, tag: str) -> bool:
        return bool(self.analysis.tagged(group, tag))


class Criterion:
    """Base class: ``score(group, ctx)`` returns one non-negative score per unit of ``group``.

    ``needs_statistics``: the pipeline collects ``ctx.statistics`` (calibration or data-free) first.
    ``self_normalized``: scores already compare across groups (e.g. absolute output errors) and
    are used as they are, instead of through :func:`comparable_scores`; a group such a criterion
    cannot score (no statistics) is scored by ``fallback``.
    ``compensation``: a pass class run after allocation that re-fits the remaining weights.
    ``alternative``: another criterion ordering units by the same cost; with sensitivity
    allocation each group is measured at its middle width in both orders and keeps the one
    that distorts the outputs less (:class:`~spa_compiler.sensitivity.MeasureSensitivity`).
    """

    name = ""
    description = ""
    needs_statistics = False
    self_normalized = False
    fallback: type[Criterion] | None = None
    compensation: Callable[[], PassLike] | None = None
    alternative: str | None = None

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator registering a criterion under ``name`` (``--criterion NAME``); a name
    already taken by another class is an error."""

    def decorate(cls: type[Criterion]) -> type[Criterion]:
        return register_named(_CRITERIA, "criterion", name, cls)

    return decorate


def _load_criteria() -> None:
    """The built-in criteria (importing them registers them), then third-party entry points."""
    importlib.import_module("spa_compiler.passes")
    for name, cls in load_entry_points("spa_prune.criteria"):
        register_criterion(name)(cls)


def available_criteria() -> dict[str, str]:
    """Registered criterion names with their one-line descriptions."""
    _load_criteria()
    return {name: cls.description for name, cls in sorted(_CRITERIA.items())}


def get_criterion(name: str) -> Criterion:
    _load_criteria()
    if name not in _CRITERIA:
        raise InputError(f"unknown criterion '{name}'; available: {', '.join(sorted(_CRITERIA))}")
    return _CRITERIA[name]()


def normalize(scores: np.ndarray) -> np.ndarray:
    """Divide by the group's mean score, so a unit's score says how it compares within its
    group, whatever the scale of its layer's weights (all-zero scores stay zero)."""
    mean = float(np.mean(scores)) if scores.size else 0.0
    return scores / mean if mean > 0 else np.zeros_like(scores, dtype=np.float64)


def comparable_scores(group: Group, scores: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """Scores that compare across groups: ``normalize(scores) * n_u``, with ``n_u`` the number
    of weights unit u owns. Normalising alone would make an average attention head (which owns
    ``4 * head_dim * hidden`` weights) weigh as much as an average FFN neuron (``2 * hidden``);
    scaling by size makes the score estimate what removing the unit takes away, in units of
    the layer's average weight. A group with no weights keeps the normalised scores."""
    normalized = normalize(np.asarray(scores, dtype=np.float64))
    sizes = ctx.weights_owned(group)
    return normalized * sizes if sizes.any() else normalized
