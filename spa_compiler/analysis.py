"""Dependency analysis: which channels of which tensors must be removed together.

Every axis of every tensor the graph reads or writes is an *axis space*; each of its indices is
an *element* with a global id. Op rules (``spa_compiler.ops``) declare exact couplings between
elements ("removing index i of this axis removes index f(i) of that one"); the connected
components of those couplings are the *units* of pruning: removing a unit removes every one of
its elements at once, so every op stays consistent. A unit containing an element of a root
axis (a weight's output axis) is a prunable channel; a unit containing any *blocked* element
(one a rule could not map, a graph input or output, an excluded node) is never removed.

A *group* is a set of units that share axes, e.g. the output channels of every convolution
feeding one chain of residual Adds: its units are the channels of that chain, and it is the
unit of scoring and reporting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Iterable

import numpy as np

from .ir import Graph, Node
from .ops import get_rule
from .ops.registry import Unsupported, normalize_axis
from .shape_values import ShapeValues

__all__ = ["AxisRef", "Unit", "Group", "Barrier", "Analysis", "analyze_graph", "connected_components"]

log = logging.getLogger(__name__)


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

    @property
    def blocked_reasons(self) -> list[str]:
        return sorted({u.blocked_by for u in self.units if u.blocked_by})


@dataclass(frozen=True)
class Barrier:
    """A node a rule could not map exactly (unknown op, run-time parameter, exclusion)."""

    node: str
    op_type: str
    reason: str


@dataclass
class Analysis:
    """The result of :func:`analyze_graph`."""

    graph: Graph
    axes: list[AxisRef]
    axis_index: dict[tuple[str, int], int]
    groups: list[Group]
    tags: dict[str, list[int]]
    barriers: list[Barrier]
    offsets: np.ndarray = field(repr=False)
    shape_values: ShapeValues | None = field(default=None, repr=False)

    def axis_id(self, tensor: str, axis: int) -> int | None:
        return self.axis_index.get((tensor, axis))

    def tagged(self, group: Group, tag: str) -> list[int]:
        """The group's member axes that carry criterion tag ``tag`` (e.g. "weight")."""
        wanted = set(self.tags.get(tag, []))
        return [a for a in group.axes if a in wanted]

    def kind(self, group: Group) -> str:
        """"heads" for attention heads (whole heads are the units), "hidden" for a hidden size
        pruned through LayerNorms (lossy), else "channels"."""
        if self.tagged(group, "heads"):
            return "heads"
        if self.tagged(group, "head_dims"):
            return "head dims"
        return "hidden" if self.tagged(group, "lossy") else "channels"

    def describe_axis(self, axis_id: int) -> str:
        ref = self.axes[axis_id]
        return f"{ref.tensor}[axis {ref.axis}]"


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


class _Builder:
    """Collects the couplings op rules declare; implements :class:`spa_compiler.ops.Coupler`."""

    def __init__(
        self, graph: Graph, shape_values: ShapeValues, prune_hidden: bool = False, head_dims: bool = False,
        within_groups: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = graph
        self.within_groups = within_groups
        self.repeat_merges: list[tuple[str, str, int]] = []
        self.opset = graph.opset
        self.prune_hidden = prune_hidden
        self.head_dims = head_dims
        self.shape_values = shape_values
        self.axes: list[AxisRef] = []
        self.axis_index: dict[tuple[str, int], int] = {}
        self.offsets: list[int] = []
        self.n = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = []
        self.roots: list[tuple[int, str]] = []
        self.tags: list[tuple[int, str]] = []
        self.node: Node | None = None
        self.declared: dict[int, np.ndarray] = {}
        self.anchors: dict[object, tuple[str, int]] = {}

    # -- the Coupler protocol ---------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.graph.shapes[name]
        except KeyError:
            raise Unsupported(f"the shape of '{name}' is unknown") from None

    def is_constant(self, name: str) -> bool:
        return self.graph.is_constant(name)

    def constant(self, name: str) -> np.ndarray:
        return self.graph.constants[name]

    def couple(self, a, a_axis, b, b_axis, a_idx=None, b_idx=None) -> None:
        ids_a = self._ids(a, a_axis, a_idx)
        ids_b = self._ids(b, b_axis, b_idx)
        if ids_a.shape != ids_b.shape:
            raise Unsupported(
                f"axis {a_axis} of '{a}' ({ids_a.size}) and axis {b_axis} of '{b}' "
                f"({ids_b.size}) do not match"
            )
        self.edges.append((ids_a, ids_b))

    def free(self, name: str, axis: int, idx: np.ndarray | None = None) -> None:
        self._ids(name, axis, idx)

    def block(self, name: str, axis: int, reason: str) -> None:
        """Keep every element of this axis, whatever else couples it."""
        axis_id = self._axis(name, axis)
        self.blocks.append((self.offsets[axis_id] + np.arange(self.axes[axis_id].size), len(self.reasons)))
        self.reasons.append(f"{self.node}: {reason}" if self.node else reason)

    def share(self, key: object, name: str, axis: int) -> None:
        """Axes sized by one shared value (a shape-constant entry) are coupled together."""
        first = self.anchors.setdefault(key, (name, axis))
        if first != (name, axis):
            self.couple(name, axis, *first)

    def root(self, name: str, axis: int) -> None:
        self.roots.append((self._axis(name, axis), self.node.name if self.node else name))

    def tag(self, name: str, axis: int, tag: str) -> None:
        self.tags.append((self._axis(name, axis), tag))

    def shape_value(self, name: str) -> list | None:
        return self.shape_values.value(name)

    def shape_value_escapes(self, name: str) -> bool:
        return self.shape_values.escapes(name)

    def repeat_merge(self, merged: str, repeated: str, outer: int) -> bool:
        self.repeat_merges.append((merged, repeated, outer))
        return merged in self.within_groups

    def consumers(self, name: str) -> list[Node]:
        return self.graph.consumers.get(name, [])

    def producer(self, name: str) -> Node | None:
        return self.graph.producer.get(name)

    # -- bookkeeping --------------------------------------------------------------------------
    def _axis(self, name: str, axis: int) -> int:
        shape = self.shape(name)
        axis = normalize_axis(axis, len(shape))
        key = (name, axis)
        found = self.axis_index.get(key)
        if found is None:
            found = len(self.axes)
            self.axis_index[key] = found
            self.axes.append(AxisRef(name, axis, shape[axis], self.graph.is_constant(name)))
            self.offsets.append(self.n)
            self.n += shape[axis]
        return found

    def _ids(self, name: str, axis: int, idx: np.ndarray | None) -> np.ndarray:
        axis_id = self._axis(name, axis)
        size = self.axes[axis_id].size
        local = np.arange(size) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        if local.size and (local.min() < 0 or local.max() >= size):
            raise Unsupported(f"index out of range on axis {axis} of '{name}'")
        mask = self.declared.setdefault(axis_id, np.zeros(size, dtype=bool))
        mask[local] = True
        return self.offsets[axis_id] + local

    def block_axes(self, name: str, reason: str, undeclared_only: bool) -> None:
        shape = self.graph.shapes.get(name)
        if shape is None:
            return
        reason_id = len(self.reasons)
        self.reasons.append(reason)
        for axis in range(len(shape)):
            axis_id = self._axis(name, axis)
            local = np.arange(shape[axis])
            if undeclared_only and axis_id in self.declared:
                local = local[~self.declared[axis_id]]
            if local.size:
                self.blocks.append((self.offsets[axis_id] + local, reason_id))


def _unknown_op_reason(node: Node) -> str:
    if node.domain not in ("", "ai.onnx"):
        return f"custom op {node.domain}::{node.op_type} is not understood"
    if node.has_subgraph:
        return f"control-flow op {node.op_type} is not pruned through"
    return f"op {node.op_type} has no pruning rule"


def _couple_nodes(graph: Graph, builder: _Builder, exclude: set[str]) -> list[Barrier]:
    barriers = []
    for node in graph.nodes:
        builder.node, builder.declared = node, {}
        mark = (len(builder.edges), len(builder.roots), len(builder.tags))
        reason = None
        rule = get_rule(node.domain, node.op_type, graph.opset)
        try:
            if node.name in exclude:
                raise Unsupported("excluded by the user")
            if rule is None:
                raise Unsupported(_unknown_op_reason(node))
            rule.couple(node, builder)
        except Unsupported as exc:
            del builder.edges[mark[0]:], builder.roots[mark[1]:], builder.tags[mark[2]:]
            builder.declared = {}
            reason = f"{node}: {exc}"
            barriers.append(Barrier(node.name, node.op_type, str(exc)))
        outer = [] if node.inner_nodes_analysed else sorted(node.subgraph_inputs)  # else inner nodes map them
        for name in dict.fromkeys([*node.inputs, *node.outputs, *outer, *node.boundary]):
            if name:
                builder.block_axes(
                    name, reason or f"{node} does not map this axis of '{name}'", undeclared_only=reason is None
                )
    return barriers


def analyze_graph(
    graph: Graph, exclude: Iterable[str] = (), prune_hidden: bool = False, head_dims: bool = False,
    allow_io_change: Iterable[str] = (),
) -> Analysis:
    """Couple every axis of ``graph`` and return its prunable groups. ``prune_hidden`` lets the
    hidden axis of LayerNorms lose elements (lossy); ``head_dims`` makes the units of attention
    head dimensions (the same dimension of every head) instead of whole heads. Graph inputs and
    outputs keep their sizes, except those whose names match a pattern of ``allow_io_change``
    (``fnmatch``, e.g. ``past_key_values.*``).

    Grouped-query attention first couples whole key/value groups; where those are blocked (a
    key/value cache in the interface) the graph is analysed again with the query heads of each
    group as the units instead (see :mod:`spa_compiler.ops.reshape`)."""
    exclude = set(exclude)
    unknown = exclude - set(graph.node_by_name)
    if unknown:
        from .errors import InputError

        raise InputError(f"--exclude names {', '.join(sorted(unknown))}, which is not a node of the model")
    changeable = {n for n in [*graph.inputs, *graph.outputs] if any(fnmatch(n, p) for p in allow_io_change)}
    shape_values = ShapeValues(graph)
    analysis, builder = _analyze(graph, shape_values, exclude, prune_hidden, head_dims, changeable, frozenset())
    blocked_groups = frozenset(
        merged for merged, repeated, outer in builder.repeat_merges
        if _axis_blocked(analysis, analysis.axis_id(repeated, outer))
    )
    if blocked_groups:
        analysis, _ = _analyze(graph, shape_values, exclude, prune_hidden, head_dims, changeable, blocked_groups)
    return analysis


def _axis_blocked(analysis: Analysis, axis_id: int | None) -> bool:
    """Whether no unit of ``axis_id`` can be removed."""
    group = next((g for g in analysis.groups if axis_id in g.axes), None)
    return group is None or all(u.blocked for u in group.units if axis_id in u.members)


def _analyze(
    graph: Graph, shape_values: ShapeValues, exclude: set[str], prune_hidden: bool, head_dims: bool,
    changeable: set[str], within_groups: frozenset[str],
) -> tuple[Analysis, _Builder]:
    builder = _Builder(graph, shape_values, prune_hidden, head_dims, within_groups)
    barriers = _couple_nodes(graph, builder, exclude)
    for name in graph.inputs:
        if name not in changeable:
            builder.block_axes(name, f"graph input '{name}'", undeclared_only=False)
    for name in graph.outputs:
        if name not in changeable:
            builder.block_axes(name, f"graph output '{name}'", undeclared_only=False)

    n = builder.n
    offsets = np.asarray(builder.offsets, dtype=np.int64)
    if builder.edges:
        a = np.concatenate([e[0] for e in builder.edges])
        b = np.concatenate([e[1] for e in builder.edges])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    labels = connected_components(n, a, b)
    groups = _build_groups(builder, labels, offsets)
    tags: dict[str, list[int]] = {}
    for axis_id, tag in builder.tags:
        tags.setdefault(tag, []).append(axis_id)
    log.debug("analysis: %d axes, %d elements, %d groups", len(builder.axes), n, len(groups))
    analysis = Analysis(graph, builder.axes, builder.axis_index, groups, tags, barriers, offsets, shape_values)
    return analysis, builder


def _build_groups(builder: _Builder, labels: np.ndarray, offsets: np.ndarray) -> list[Group]:
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
    builder: _Builder, comp_reason: np.ndarray, unit_labels: np.ndarray, axes: np.ndarray, indices: np.ndarray
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
