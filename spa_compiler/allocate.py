"""Choosing which channels to remove to meet a target.

*Global* scope ranks removal steps across all groups by ``score / saving ** 0.5`` (the
comparable score, see ``criteria.comparable_scores``, of the channels a step removes, over the
square root of the cost it saves) and takes the lowest until the target is met. Dividing by
the full saving would strip first the channels of residual streams, each of which feeds many
layers; dividing by nothing would ignore what a removal buys. With size-weighted scores the
square root keeps outputs closest to the original: sentence-embedding cosine 0.570 for MiniLM
at half the FLOPs (0.534 dividing by the full saving). A step removes the lowest-scored channels of one
group, as many as bring its width to the next lower multiple of ``round_to``; costs are recounted
after every step (a step's saving depends on the widths of neighbouring groups), lazily: a popped
step whose priority went up is pushed back. *Uniform* scope removes the same fraction of every
group, the fraction found by bisection. Every group keeps at least ``min_keep`` of its channels
(and at least one), and no axis is emptied.

*Rounding per group.* Each group first rounds as :func:`unit_steps` says (attention heads and
head dimensions by the channels they span on their widest axis, ``Constraints.step_for``;
other groups by ``Constraints.rounding_for`` their width). When that
misses the target (short of it, or more than the tolerance past it, as coarse steps of narrow
groups do: a 16-channel group only halves), groups are rounded finer, narrowest first
(:func:`rounding_levels`): each level halves the rounding of the narrowest groups (by powers of
two of their width) still rounded coarser than their floor, and the allocation runs again,
until the target is met. Groups at least ``4 * round_to`` wide keep multiples of 8 (or of
``round_to`` when smaller) while any narrower group can still round finer: they are the ones
whose widths decide the kernels' speed. Only then do they round finer too, so the target is
reached whenever channels remain to remove. The plan records the groups rounded finer.

*Measured distortions* (``cost_exponent`` 1, from :mod:`.sensitivity`) add up to a plan's
distortion, so plans can be compared: the plan that lands within the tolerance competes with
the knapsack's at the rule's rounding (:func:`_knapsack`), which may end further past the
target; the knapsack's replaces it when it measures under ``1 / CLEAR_GAIN`` of its distortion
(:func:`_least_distortion`), and a plan past the tolerance records how much more the one closer
to the target measured. When no rounding lands, the plan that comes closest competes with the
knapsack's at its own rounding. Finer roundings are never chosen for a lower distortion alone:
they cost speed.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from .analysis import Analysis, Group
from .cost import CostMetric, CostModel
from .errors import TargetError

__all__ = [
    "Target", "Constraints", "Plan", "allocate", "unit_counts", "rounding_levels", "unit_steps", "COST_EXPONENT",
    "DISTORTION_EXPONENT",
]

Scope = Literal["global", "uniform"]


@dataclass(frozen=True)
class Target:
    """``kind`` a cost metric's name ("flops", "params", ...): keep at most ``value`` of the
    original cost; "ratio": remove ``value`` of every group's channels."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if not 0.0 < self.value < 1.0:
            raise TargetError(f"--{self.kind} must be between 0 and 1 (exclusive), got {self.value}")


@dataclass(frozen=True)
class Constraints:
    """``round_to``: kept channel counts are multiples of it (16 suits both AVX2's 8-wide and
    AVX-512's 16-wide blocked kernels). A group narrower than ``2 * round_to`` to begin with
    rounds to the largest halving of it that lets it shrink; a wider group keeps multiples of
    ``round_to`` all the way down, which is what keeps it on the fast kernels."""

    scope: Scope = "global"
    round_to: int = 16
    min_keep: float = 0.1

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise TargetError(f"--round-to must be at least 1, got {self.round_to}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise TargetError(f"--min-keep must be between 0 and 1, got {self.min_keep}")

    def rounding_for(self, width: int) -> int:
        """Channels per step for a group ``width`` channels wide."""
        step = self.round_to
        while step > 1 and width < 2 * step:
            step //= 2
        return step

    def step_for(self, group: Group) -> int:
        """Units per step: the fewest whose channels on the group's widest axis make a multiple
        of :meth:`rounding_for` that axis. A unit is one channel there for most groups; a head
        dimension spans every head (12 channels of a 12-head projection), so at ``round_to``
        16 head dimensions go 4 at a time (48 channels), not 16 (192, half of a 32-dimension
        head), and whole heads of 32 channels one at a time, not 4 (a third of 12 heads)."""
        width, per_unit = widest_axis(group)
        rounding = self.rounding_for(width)
        return rounding // math.gcd(rounding, per_unit)


SPANNING_KINDS = ("heads", "head dims")
"""Group kinds whose units round by the channels they span (:meth:`Constraints.step_for`)."""


def unit_steps(analysis: Analysis, c: Constraints) -> dict[int, int]:
    """Units per step of every group by the rounding rule: attention heads and head dimensions
    by the channels they span (:meth:`Constraints.step_for`), other groups a channel per unit (a
    recurrent layer's hidden unit spans its gates, but its hidden size is itself a dimension of
    the recurrence's matrix product and keeps multiples of the rounding)."""
    return {g.id: c.step_for(g) if analysis.kind(g) in SPANNING_KINDS else c.rounding_for(len(g.units))
            for g in analysis.groups}


def widest_axis(group: Group) -> tuple[int, int]:
    """The channels of the group's widest axis and the channels every unit holds there (their
    greatest common divisor); ``(units, 1)`` for a group without member axes."""
    widths: dict[int, list[int]] = {}
    for unit in group.units:
        for axis, indices in unit.members.items():
            widths.setdefault(axis, []).append(len(indices))
    if not widths:
        return len(group.units), 1
    counts = max(widths.values(), key=sum)
    return sum(counts), math.gcd(*counts)


@dataclass
class Plan:
    """Units to remove per group id, the cost ratio reached in the target's cost kind, the
    groups rounded finer than :func:`unit_steps` to reach it (group id -> units per step used),
    and, for a plan past the target by more than the tolerance because the plan closer to it
    measured worse, the measured distortion of that plan over this plan's."""

    removed: dict[int, list[int]] = field(default_factory=dict)
    achieved: float = 1.0
    rounded_finer: dict[int, int] = field(default_factory=dict)
    landing_distortion: float | None = None

    @property
    def n_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def unit_counts(group: Group, units: list[int]) -> dict[int, int]:
    """Elements leaving each axis when ``units`` of ``group`` go."""
    counts: dict[int, int] = {}
    for k in units:
        for axis, indices in group.units[k].members.items():
            counts[axis] = counts.get(axis, 0) + len(indices)
    return counts


class _GroupSteps:
    """The removal steps of one group, lowest scores first, respecting rounding and min-keep."""

    def __init__(self, group: Group, scores: np.ndarray, c: Constraints, step: int) -> None:
        self.group = group
        self.scores = scores
        self.order = group.ranked(scores)
        self.n = len(group.units)
        self.floor = max(1, math.ceil(c.min_keep * self.n))
        self.step = step
        self.taken = 0

    def next_step(self) -> list[int] | None:
        kept = self.n - self.taken
        target = ((kept - 1) // self.step) * self.step
        if target < self.floor or self.taken + kept - target > len(self.order):
            return None
        return self.order[self.taken:self.taken + kept - target]

    def take(self, step: list[int]) -> None:
        self.taken += len(step)

    @property
    def removed(self) -> list[int]:
        return sorted(self.order[:self.taken])


def _fits(cost: CostModel, counts: dict[int, int]) -> bool:
    return all(cost.kept[a] - n >= 1 for a, n in counts.items())


COST_EXPONENT = 0.5
DISTORTION_EXPONENT = 1.0
"""``cost_exponent`` of scores that are measured output distortions (:mod:`.sensitivity`),
additive across groups: a plan's total distortion is the sum of its removed units' scores."""
CLEAR_GAIN = 1.5
"""How many times less distortion the knapsack's plan must measure to replace the one that lands
(:func:`_least_distortion`): the distortions come from a few samples and add up only roughly."""


def _priority(cost: CostModel, steps: _GroupSteps, step: list[int], exponent: float) -> float:
    saving = cost.saving(unit_counts(steps.group, step))
    return float(steps.scores[step].sum()) / saving**exponent if saving > 0 else math.inf


def _allocate_global(
    analysis: Analysis, scores: dict[int, np.ndarray], cost: CostModel, budget: float, floor: float,
    c: Constraints, exponent: float, steps: dict[int, int], finishes: list[tuple[float, dict[int, list[int]]]] | None = None,
) -> dict[int, list[int]]:
    """Greedy removal down to ``budget``; a step that would go below ``floor`` is set aside
    and taken at the end only if no other step lands between the two. Given ``finishes``, each
    time some single step could reach the budget, the plan it would finish (the least
    distorting such step, see :func:`_finish`) is appended there."""
    states = {g.id: _GroupSteps(g, scores[g.id], c, steps[g.id]) for g in analysis.groups}
    heap: list[tuple[float, int]] = []
    set_aside: list[int] = []
    for gid, state in states.items():
        step = state.next_step()
        if step:
            heapq.heappush(heap, (_priority(cost, state, step, exponent), gid))
    # savings only shrink as widths do: no step saves more than the largest first one
    largest = max((s.saving for s in _next_steps(states, cost)), default=0.0) if finishes is not None else 0.0
    taken, finished_at = 0, -1
    while heap and cost.total > budget:
        if finishes is not None and cost.total - largest <= budget and taken != finished_at:
            finished_at = taken
            finishes.extend(_finish(states, cost, budget))
        priority, gid = heapq.heappop(heap)
        state = states[gid]
        step = state.next_step()
        current = _priority(cost, state, step, exponent)
        if current > priority + 1e-12 and heap and current > heap[0][0]:
            heapq.heappush(heap, (current, gid))
            continue
        if math.isinf(current):
            continue
        counts = unit_counts(state.group, step)
        if not _fits(cost, counts):
            continue
        if cost.total - cost.saving(counts) < floor:
            set_aside.append(gid)
            continue
        cost.remove(counts)
        state.take(step)
        taken += 1
        following = state.next_step()
        if following:
            heapq.heappush(heap, (_priority(cost, state, following, exponent), gid))
    if cost.total > budget and set_aside:
        def remaining(gid: int) -> float:
            return cost.total - cost.saving(unit_counts(states[gid].group, states[gid].next_step()))

        gid = max(set_aside, key=remaining)
        step = states[gid].next_step()
        cost.remove(unit_counts(states[gid].group, step))
        states[gid].take(step)
    return {gid: s.removed for gid, s in states.items() if s.taken}


def _uniform_removal(
    analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, c: Constraints, steps: dict[int, int]
) -> dict[int, list[int]]:
    """The lowest-scored ``ratio`` of every group (rounded, at least ``min_keep``), skipping
    any unit whose removal would empty an axis."""
    kept = np.asarray([ref.size for ref in analysis.axes], dtype=np.int64)
    removed: dict[int, list[int]] = {}
    for group in analysis.groups:
        n = len(group.units)
        keep = max(math.ceil(c.min_keep * n), 1, n - math.floor(ratio * n))
        step = steps[group.id]
        keep = min(n, math.ceil(keep / step) * step)
        take = []
        for k in group.ranked(scores[group.id]):
            if len(take) == n - keep:
                break
            counts = unit_counts(group, [k])
            if all(kept[a] - m >= 1 for a, m in counts.items()):
                for a, m in counts.items():
                    kept[a] -= m
                take.append(k)
        if take:
            removed[group.id] = sorted(take)
    return removed


def _cost_after(analysis: Analysis, metric: CostMetric, removed: dict[int, list[int]]) -> float:
    cost = CostModel(analysis, metric)
    groups = {g.id: g for g in analysis.groups}
    for gid, units in removed.items():
        cost.remove(unit_counts(groups[gid], units))
    return cost.total / cost.original_total if cost.original_total else 1.0


def _allocate_uniform(analysis, scores, metric, budget_ratio, c, steps) -> dict[int, list[int]]:
    low, high = 0.0, 1.0
    best = _uniform_removal(analysis, scores, high, c, steps)
    if _cost_after(analysis, metric, best) > budget_ratio:
        return best
    for _ in range(30):
        mid = (low + high) / 2
        trial = _uniform_removal(analysis, scores, mid, c, steps)
        if _cost_after(analysis, metric, trial) <= budget_ratio:
            high, best = mid, trial
        else:
            low = mid
    return best


def allocate(
    analysis: Analysis, scores: dict[int, np.ndarray], target: Target, c: Constraints, metric: CostMetric,
    tolerance: float = 0.02, cost_exponent: float = COST_EXPONENT,
) -> Plan:
    """Choose the units to remove. ``scores`` are normalised per group (higher = keep).
    ``metric`` is the target's cost metric (MACs for a ``ratio`` target, for the figure).
    Global removal steps are ranked by score over saving to the power ``cost_exponent``: 0.5 for
    criterion scores (see the module docstring), 1 for measured output distortions, whose ratio
    to the cost saved is the knapsack's greedy order."""
    rule = unit_steps(analysis, c)
    if target.kind == "ratio":
        removed = _uniform_removal(analysis, scores, target.value, c, rule)
        return Plan(removed, _cost_after(analysis, metric, removed))
    if CostModel(analysis, metric).original_total <= 0:
        raise TargetError(f"the model has no {metric.label} to reduce ({metric.description})")
    best: Plan | None = None
    best_steps = rule
    measured = cost_exponent == DISTORTION_EXPONENT and c.scope == "global"
    for steps in rounding_levels(analysis.groups, c, rule):
        if c.scope == "uniform":
            removed = _allocate_uniform(analysis, scores, metric, target.value, c, steps)
        else:
            cost = CostModel(analysis, metric)
            total = cost.original_total
            removed = _allocate_global(
                analysis, scores, cost, target.value * total, (target.value - tolerance) * total, c, cost_exponent, steps
            )
        finer = {gid: steps[gid] for gid in removed if steps[gid] < rule[gid]}
        plan = Plan(removed, _cost_after(analysis, metric, removed), finer)
        if best is None or _miss(plan, target) < _miss(best, target):
            best, best_steps = plan, steps
        if target.value - tolerance <= plan.achieved <= target.value:
            if measured:
                return _least_distortion(analysis, scores, target, tolerance, c, metric, rule, rule, plan)
            break
    else:  # no rounding lands within the tolerance
        if measured and best is not None:
            return _least_distortion(analysis, scores, target, tolerance, c, metric, rule, best_steps, best)
    return best


def _least_distortion(
    analysis: Analysis, scores: dict[int, np.ndarray], target: Target, tolerance: float, c: Constraints,
    metric: CostMetric, rule: dict[int, int], steps: dict[int, int], plan: Plan,
) -> Plan:
    """With measured distortions (additive: a plan's distortion is the total of its removed
    units' scores), ``plan``, the greedy plan that lands within the tolerance (``steps`` then
    the rule's rounding) or, when no rounding lands, the one that comes closest (at its
    rounding ``steps``), unless :func:`_knapsack`'s plan at ``steps``, whose last step may go
    further past the target, measures clearly less (under ``1 / CLEAR_GAIN`` of its
    distortion). Landing can cost far more: when a wide group's next step would go past the
    tolerance, the steps that land instead may halve narrow groups, each of which distorts the
    outputs more (CREPE tiny's pitch tracker at ``--flops 0.8``: two 16-channel convolutions
    halved, 0.16 of the outputs' energy, against 0.0017 for eight more of the 128-channel first
    convolution's channels). The greedy plan that misses does worse still: it takes every step
    short of the tolerance's floor, however distorting, before the step past that floor it had
    set aside (PESTO's pitch estimator, data-free at ``--flops 0.75``: three narrow convolutions
    cut to a tenth for 2% of the FLOPs, then its wide group's step to 0.715 all the same)."""
    cost = CostModel(analysis, metric)
    removed = _knapsack(analysis, scores, cost, target.value * cost.original_total, c, steps)
    achieved = _cost_after(analysis, metric, removed)
    least, planned = _distortion(scores, removed), _distortion(scores, plan.removed)
    if achieved > target.value or least * CLEAR_GAIN >= planned:
        return plan
    finer = {gid: steps[gid] for gid in removed if steps[gid] < rule[gid]}
    if achieved >= target.value - tolerance or achieved >= plan.achieved:  # it lands, or no plan came closer
        return Plan(removed, achieved, finer)
    return Plan(removed, achieved, finer, landing_distortion=planned / least if least > 0 else math.inf)


@dataclass(frozen=True)
class _Step:
    """A group's next removal: its units, the elements leaving each axis, the units' summed
    scores (with measured distortions, the distortion it adds) and the cost it saves."""

    group: int
    units: list[int]
    counts: dict[int, int]
    distortion: float
    saving: float


def _knapsack(
    analysis: Analysis, scores: dict[int, np.ndarray], cost: CostModel, budget: float, c: Constraints,
    steps: dict[int, int],
) -> dict[int, list[int]]:
    """Least total distortion within ``budget``, greedily: steps in the order of distortion per
    cost saved, but every time one step could reach the budget, the plan finished by the least
    distorting such step is a candidate; the least distorting candidate (the greedy's own end
    among them) wins. Greedy alone would finish with whichever step comes next in its order,
    however large its distortion and whatever smaller one would do."""
    finishes: list[tuple[float, dict[int, list[int]]]] = []
    removed = _allocate_global(analysis, scores, cost, budget, -math.inf, c, DISTORTION_EXPONENT, steps, finishes)
    if cost.total <= budget:
        finishes.append((_distortion(scores, removed), removed))
    return min(finishes, key=lambda finish: finish[0])[1] if finishes else removed


def _finish(states: dict[int, _GroupSteps], cost: CostModel, budget: float) -> list[tuple[float, dict[int, list[int]]]]:
    """The plan, and its distortion, that the least distorting next step reaching ``budget``
    would finish; none when no step reaches it."""
    reaching = [step for step in _next_steps(states, cost) if cost.total - step.saving <= budget]
    if not reaching:
        return []
    last = min(reaching, key=lambda step: step.distortion)
    removed = {gid: list(s.order[:s.taken]) for gid, s in states.items() if s.taken}
    removed[last.group] = sorted(removed.get(last.group, []) + last.units)
    spent = sum(float(s.scores[s.order[:s.taken]].sum()) for s in states.values())
    return [(spent + last.distortion, {gid: sorted(units) for gid, units in removed.items()})]


def _next_steps(states: dict[int, _GroupSteps], cost: CostModel) -> list[_Step]:
    """Every group's next step that saves cost, fits (no axis emptied) and has a finite score."""
    options = []
    for gid, state in states.items():
        units = state.next_step()
        if not units:
            continue
        counts = unit_counts(state.group, units)
        distortion = float(state.scores[units].sum())
        if not _fits(cost, counts) or math.isinf(distortion):
            continue
        saving = cost.saving(counts)
        if saving > 0:
            options.append(_Step(gid, units, counts, distortion, saving))
    return options


def _distortion(scores: dict[int, np.ndarray], removed: dict[int, list[int]]) -> float:
    """The total of the removed units' scores: with measured distortions, the plan's distortion."""
    return float(sum(scores[gid][units].sum() for gid, units in removed.items()))


def _miss(plan: Plan, target: Target) -> tuple[bool, float]:
    """Orders plans: those meeting the target first, then the closest to it."""
    return plan.achieved > target.value, abs(plan.achieved - target.value)


def rounding_levels(groups: list[Group], c: Constraints, rule: dict[int, int] | None = None) -> Iterator[dict[int, int]]:
    """Successively finer roundings per group id (see the module docstring): the rule's first
    (:func:`unit_steps`; without ``rule``, a channel per unit), then, level by level, the
    narrowest groups' rounding halved; groups ``4 * round_to`` wide or wider stop at
    ``min(8, round_to)`` until no narrower group can round finer."""
    steps = dict(rule) if rule is not None else {g.id: c.rounding_for(len(g.units)) for g in groups}
    yield dict(steps)
    wide, speed = 4 * c.round_to, min(8, c.round_to)
    for floor in (lambda n: speed if n >= wide else 1, lambda n: 1):
        while True:
            candidates = [g for g in groups if g.prunable and steps[g.id] > floor(len(g.units))]
            if not candidates:
                break
            narrowest = min(len(g.units).bit_length() for g in candidates)
            for g in candidates:
                if len(g.units).bit_length() == narrowest:
                    steps[g.id] //= 2
            yield dict(steps)
