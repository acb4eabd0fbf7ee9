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

from .groups import AxisRef, Barrier, Group, Unit, build_groups, connected_components
from .ir import STANDARD_DOMAINS, Graph, Node
from .ops import get_rule
from .ops.registry import Unsupported, normalize_axis
from .shape_values import ShapeValues

__all__ = ["AxisRef", "Unit", "Group", "Barrier", "Analysis", "analyze_graph", "connected_components"]

log = logging.getLogger(__name__)


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


class ElementCoupler:
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

    def shape_value_escaping_dims(self, name: str) -> set | None:
        return self.shape_values.escaping_dims(name)

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
    if node.domain not in STANDARD_DOMAINS:
        return f"custom op {node.domain}::{node.op_type} is not understood"
    if node.has_subgraph:
        return f"control-flow op {node.op_type} is not pruned through"
    standard = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    return f"op {standard} has no pruning rule"


def _couple_nodes(graph: Graph, builder: ElementCoupler, exclude: set[str]) -> list[Barrier]:
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
) -> tuple[Analysis, ElementCoupler]:
    builder = ElementCoupler(graph, shape_values, prune_hidden, head_dims, within_groups)
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
    groups = build_groups(builder, labels, offsets)
    tags: dict[str, list[int]] = {}
    for axis_id, tag in builder.tags:
        tags.setdefault(tag, []).append(axis_id)
    log.debug("analysis: %d axes, %d elements, %d groups", len(builder.axes), n, len(groups))
    analysis = Analysis(graph, builder.axes, builder.axis_index, groups, tags, barriers, offsets, shape_values)
    return analysis, builder
