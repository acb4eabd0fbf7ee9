"""Units and groups of pruning, and how they are built from element couplings.

The couplings the op rules declare join elements (indices of axes) into connected components
(:func:`connected_components`); a component holding an element of a root axis is a *unit*, and
units sharing axes form a *group* (:func:`build_groups`), see :mod:`spa_compiler.analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .analysis import ElementCoupler

__all__ = ["AxisRef", "Unit", "Group", "Barrier", "connected_components", "build_groups"]


@dataclass(frozen=True)
class AxisRef:
    """One axis of one tensor."""

    tensor: str
    axis: int
    size: int
    constant: bool


@dataclass
class Unit:
    """One prunable channel: the indices it occupies on each member axis (by axis id)."""

    members: dict[int, np.ndarray]
    blocked_by: str | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None


@dataclass
class Group:
    """Units coupled through shared axes; ``name`` is the node whose weight roots the group."""

    id: int
    name: str
    axes: list[int]
    units: list[Unit]
    root_node: str
    _by_axis: dict[int, tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def by_axis(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """For each member axis: (unit of each occupied index, the index), units in order."""
        if self._by_axis is None:
            parts: dict[int, list[tuple[int, np.ndarray]]] = {}
            for k, unit in enumerate(self.units):
                for axis, indices in unit.members.items():
                    parts.setdefault(axis, []).append((k, indices))
            self._by_axis = {
                axis: (np.repeat([k for k, _ in pairs], [len(i) for _, i in pairs]), np.concatenate([i for _, i in pairs]))
                for axis, pairs in parts.items()
            }
        return self._by_axis

    @property
    def prunable(self) -> list[int]:
        return [k for k, unit in enumerate(self.units) if not unit.blocked]

    def ranked(self, scores) -> list[int]:
        """The prunable units, lowest score first (ties by unit index): the order they go in."""
        return sorted(self.prunable, key=lambda k: (scores[k], k))

    @property
    def blocked_reasons(self) -> list[str]:
        return sorted({u.blocked_by for u in self.units if u.blocked_by})


@dataclass(frozen=True)
class Barrier:
    """A node a rule could not map exactly (unknown op, run-time parameter, exclusion)."""

    node: str
    op_type: str
    reason: str


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label the components of an undirected graph on ``n`` nodes with edges ``a[k]--b[k]``.

    Vectorised hook-and-compress: every round hooks the larger root of each edge under the
    smaller one, then compresses every path to its root, until no edge joins two roots. Labels
    are compact (0..k-1) and ordered by the smallest node of each component.
    """
    parent = np.arange(n)
    while a.size:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(pa[differ], pb[differ]), np.minimum(pa[differ], pb[differ]))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.unique(parent, return_inverse=True)[1]


def build_groups(builder: ElementCoupler, labels: np.ndarray, offsets: np.ndarray) -> list[Group]:
    n_comp = int(labels.max()) + 1 if labels.size else 0
    comp_reason = np.full(n_comp, -1, dtype=np.int64)
    for ids, reason_id in reversed(builder.blocks):
        comp_reason[labels[ids]] = reason_id  # the first declared reason wins

    root_elems = np.concatenate(
        [offsets[a] + np.arange(builder.axes[a].size) for a, _ in builder.roots]
    ) if builder.roots else np.zeros(0, dtype=np.int64)
    root_label_first_node: dict[int, str] = {}
    for axis_id, node in builder.roots:
        for label in np.unique(labels[offsets[axis_id] + np.arange(builder.axes[axis_id].size)]):
            root_label_first_node.setdefault(int(label), node)
    rooted = np.zeros(n_comp, dtype=bool)
    rooted[labels[root_elems]] = True

    elems = np.flatnonzero(rooted[labels])
    if not elems.size:
        return []
    elem_axis = np.searchsorted(offsets, elems, side="right") - 1
    elem_unit = labels[elems]
    # groups: components of the bipartite graph unit -- axis
    group_of = connected_components(n_comp + len(builder.axes), elem_unit, n_comp + elem_axis)
    elem_group = group_of[elem_unit]
    first_root = np.full(n_comp, np.iinfo(np.int64).max)
    np.minimum.at(first_root, labels[root_elems], root_elems)

    order = np.lexsort((elems, first_root[elem_unit], elem_group))
    elems, elem_axis, elem_unit, elem_group = elems[order], elem_axis[order], elem_unit[order], elem_group[order]
    local = elems - offsets[elem_axis]
    groups: list[Group] = []
    bounds = _run_bounds(elem_group)
    for start, end in zip(bounds[:-1], bounds[1:]):
        units, by_axis = _units(builder, comp_reason, elem_unit[start:end], elem_axis[start:end], local[start:end])
        first_label = int(elem_unit[start])
        node = builder.graph.node_by_name[root_label_first_node[first_label]]
        groups.append(Group(len(groups), f"{node.op_type} '{node.name}'", sorted(by_axis), units, node.name, by_axis))
    position = {name: k for k, name in enumerate(builder.graph.node_by_name)}
    groups.sort(key=lambda g: (position[g.root_node], g.axes[0]))
    for k, group in enumerate(groups):
        group.id = k
    return groups


def _run_bounds(values: np.ndarray) -> list[int]:
    """Start of every run of equal consecutive ``values``, and their length at the end."""
    return [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]


def _units(
    builder: ElementCoupler, comp_reason: np.ndarray, unit_labels: np.ndarray, axes: np.ndarray, indices: np.ndarray
) -> tuple[list[Unit], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One group's units from its elements (sorted by unit, then axis and index): each unit's
    member indices per axis, and per axis the (unit ordinal, index) of every element."""
    unit_starts = _run_bounds(unit_labels)
    ordinal = np.repeat(np.arange(len(unit_starts) - 1), np.diff(unit_starts))
    members: list[dict[int, np.ndarray]] = [{} for _ in range(len(unit_starts) - 1)]
    change = np.flatnonzero((unit_labels[1:] != unit_labels[:-1]) | (axes[1:] != axes[:-1])) + 1
    runs = [0, *change.tolist(), len(axes)]
    for start, end, k, axis in zip(runs[:-1], runs[1:], ordinal[runs[:-1]].tolist(), axes[runs[:-1]].tolist()):
        members[k][axis] = indices[start:end]
    reasons = comp_reason[unit_labels[unit_starts[:-1]]].tolist()
    units = [Unit(m, builder.reasons[r] if r >= 0 else None) for m, r in zip(members, reasons)]
    by_axis_order = np.argsort(axes, kind="stable")
    sorted_axes = axes[by_axis_order]
    axis_bounds = _run_bounds(sorted_axes)
    by_axis = {
        int(sorted_axes[start]): (ordinal[by_axis_order[start:end]], indices[by_axis_order[start:end]])
        for start, end in zip(axis_bounds[:-1], axis_bounds[1:])
    }
    return units, by_axis
