"""Control-flow subgraphs (the bodies of If, Loop and Scan) seen as part of one graph.

The analysis treats the nodes inside a subgraph like any other: their tensors are named
uniquely in ONNX exports, and a subgraph reads outer-scope tensors (weights, activations) by
name, so couplings flow through those names as they do in the main graph. What a control-flow
node adds is its *boundary*: the subgraph's formal inputs (a Loop's iteration count, condition
and carried values, a Scan's slices) and formal outputs. Its op rule couples what crosses the
boundary exactly (an If's outputs are its branches' outputs); everything else on the boundary is
blocked. When a subgraph repeats a name defined elsewhere, its nodes are not analysed and its
owner stays a barrier.

Inner nodes are listed just before their owner, in the order of their subgraph, so a walk over
the graph's nodes still meets producers before consumers.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = [
    "attribute_subgraphs", "subgraphs_of", "walk_nodes", "inner_value_infos", "all_initializers", "defined_names",
    "flattenable", "boundary_names", "hoist_initializers", "control_flow_notes",
]


def attribute_subgraphs(attr: onnx.AttributeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs an attribute holds (none unless it is a GRAPH or GRAPHS attribute)."""
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The node's subgraph attributes, in attribute order."""
    for attr in node.attribute:
        yield from attribute_subgraphs(attr)


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs, at any depth, each subgraph's nodes just
    before their owner."""
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield from walk_nodes(sub)
        yield node


def inner_value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    """Value infos (intermediate, formal inputs and outputs) of every subgraph of ``graph``."""
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield from sub.value_info
            yield from sub.input
            yield from sub.output
            yield from inner_value_infos(sub)


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield from all_initializers(sub)


def defined_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name ``graph`` and its subgraphs define: inputs, initializers (once when also an
    input, as IR < 4 lists them), node outputs."""
    yield from {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        yield from (o for o in node.output if o)
        for sub in subgraphs_of(node):
            yield from defined_names(sub)


def flattenable(model: onnx.ModelProto) -> bool:
    """Whether no name is defined twice across all scopes (tensors and nodes), so that inner
    nodes can be analysed with the main graph's."""
    tensors = Counter(defined_names(model.graph))
    nodes = Counter(n.name for n in walk_nodes(model.graph) if n.name)
    return all(count == 1 for count in tensors.values()) and all(count == 1 for count in nodes.values())


def boundary_names(node: onnx.NodeProto) -> list[str]:
    """Formal inputs and outputs of the node's subgraphs."""
    return [v.name for sub in subgraphs_of(node) for v in (*sub.input, *sub.output) if v.name]


def hoist_initializers(model: onnx.ModelProto) -> None:
    """Move the initializers of every subgraph into the main graph, which every subgraph reads by
    name: one place for the weights the rewriter slices and the passes feed as inputs. Constant
    folding also copies the outer weights a subgraph reads into it (once per branch); copies of a
    name that hold the same value become one. A name holding different values, or also computed
    or fed in some scope, stays where it is (and keeps the subgraphs from being analysed)."""
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            copies.setdefault(tensor.name, []).append((graph, tensor))
        for node in graph.node:
            for sub in subgraphs_of(node):
                collect(sub)

    collect(model.graph)
    computed = {o for n in walk_nodes(model.graph) for o in n.output} | _graph_inputs(model.graph)
    for name, found in copies.items():
        if all(graph is model.graph for graph, _ in found) or name in computed:
            continue
        values = [numpy_helper.to_array(t) for _, t in found]
        if any(v.dtype != values[0].dtype or not np.array_equal(v, values[0]) for v in values[1:]):
            continue
        if all(graph is not model.graph for graph, _ in found):
            model.graph.initializer.append(found[0][1])
        for graph, tensor in found:
            if graph is not model.graph:
                graph.initializer.remove(tensor)


def _graph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Formal inputs (not initializers) of ``graph`` and its subgraphs."""
    names = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    for node in graph.node:
        for sub in subgraphs_of(node):
            names |= _graph_inputs(sub)
    return names


def control_flow_notes(analysis: "Analysis") -> list[str]:
    """For the report: what became of each control-flow node's subgraphs: how many of the
    channels made inside them stay, and why; or that nothing inside was analysed."""
    notes = []
    for node in analysis.graph.nodes:
        if not node.boundary:
            continue
        where = f"{node.op_type} node '{node.name}'"
        if not node.inner_nodes_analysed:
            notes.append(f"{where}: nothing inside its subgraphs is pruned (names repeat across scopes)")
            continue
        inner = {n.name for n in analysis.graph.nodes if n.scope == node.name}
        groups = [g for g in analysis.groups if g.root_node in inner]
        units = sum(len(g.units) for g in groups)
        stay = sum(len(g.units) - len(g.prunable) for g in groups)
        reasons = sorted({r for g in groups for r in g.blocked_reasons})
        why = f" ({'; '.join(reasons[:2])})" if reasons else ""
        notes.append(f"{where}: {len(inner)} inner nodes analysed with the graph; {stay} of the {units} channels made inside stay{why}")
    return notes
