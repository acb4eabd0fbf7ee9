"""Depth units: residual branches that can be removed whole (FinerCut, ShortGPT).

A residual stream adds each block's output to its input: ``h = x + f(x)``. Removing the branch
``f`` (an attention or FFN sublayer of a transformer, the convolutions of a CNN's residual block)
leaves ``h = x``: the join ``Add`` returns its other input, and every node and weight only ``f``
used goes. This module finds such branches and rewrites the graph without them.

Finding them is a dominator question. With a virtual sink after the graph outputs, node ``n`` is
*post-dominated* by node ``e`` when every path from ``n`` to the outputs passes through ``e``. For
a join ``j = Add(a, b)`` with ``b`` made by node ``e``, the branch is ``e`` and every node ``e``
post-dominates (``networkx.immediate_dominators`` on the reversed graph): exactly the nodes whose
results reach the outputs only through ``b``, so removing them changes nothing but ``b``. It is a
removable branch when it

* computes none of ``a`` (no node of it is ``a``'s producer or an ancestor of it),
* reads the stream: one of its inputs from outside is ``a`` or an ancestor of ``a`` (the fork),
* holds a weighted node (a Conv, Gemm or MatMul with a constant weight), and
* produces no graph output, while ``a``, ``b`` and the join have one shape (no broadcasting).

Nodes the branch reads but does not own (rotary tables, attention masks, the stream itself) are
used elsewhere and stay. Removing a branch is exact by construction: the rewritten model computes
what the original computes with ``b`` forced to zero (the tests check exactly that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import networkx as nx
import onnx
from onnx import helper

from .ir import Graph
from .proto_copy import keep_initializers

__all__ = ["Branch", "find_branches", "remove_branches", "gate_branches", "gate_name"]

log = logging.getLogger(__name__)

_SINK = "\0sink"
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Branch:
    """A removable residual branch: ``join`` adds ``skip`` (kept) and ``exit`` (the branch's
    output, made by ``nodes``)."""

    join: str
    skip: str
    exit: str
    nodes: frozenset[str]

    def describe(self, graph: Graph) -> str:
        weighted = sorted(n for n in self.nodes if graph.node_by_name[n].op_type in _WEIGHTED)
        return f"{len(self.nodes)} nodes into '{self.join}' ({', '.join(weighted[:4])}{', ...' if len(weighted) > 4 else ''})"


def _node_graph(graph: Graph) -> nx.DiGraph:
    """Nodes linked producer -> consumer, graph-output producers -> the sink."""
    dag = nx.DiGraph()
    dag.add_nodes_from(node.name for node in graph.nodes if not node.scope)
    dag.add_node(_SINK)
    for node in graph.nodes:
        if node.scope:
            continue
        for name in node.outputs:
            for consumer in graph.consumers.get(name, []):
                dag.add_edge(node.name, consumer.scope or consumer.name)
            if name in graph.outputs:
                dag.add_edge(node.name, _SINK)
    return dag


def _post_dominated(dag: nx.DiGraph) -> dict[str, set[str]]:
    """For every node, the nodes it post-dominates (itself included)."""
    reverse = dag.reverse(copy=False)
    reachable = nx.ancestors(dag, _SINK) | {_SINK}
    idom = nx.immediate_dominators(reverse.subgraph(reachable), _SINK)
    tree = nx.DiGraph((parent, child) for child, parent in idom.items() if child != parent)
    tree.add_nodes_from(idom)
    return {n: nx.descendants(tree, n) | {n} for n in idom if n != _SINK}


def _is_weighted(graph: Graph, name: str) -> bool:
    node = graph.node_by_name[name]
    return node.op_type in _WEIGHTED and any(graph.is_constant(i) for i in node.inputs[1:] if i)


def find_branches(graph: Graph) -> list[Branch]:
    """Every removable residual branch of ``graph`` (see the module docstring), in graph order."""
    dag = _node_graph(graph)
    dominated = _post_dominated(dag)
    branches = []
    for join in graph.nodes:
        if join.scope or join.op_type != "Add" or len(join.inputs) != 2:
            continue
        out_shape = graph.shapes.get(join.outputs[0])
        for k in (0, 1):
            exit_name, skip = join.inputs[1 - k], join.inputs[k]
            maker, skip_maker = graph.producer.get(exit_name), graph.producer.get(skip)
            if maker is None or maker.scope or graph.is_constant(skip) or maker.name not in dominated:
                continue
            if graph.shapes.get(exit_name) != out_shape or graph.shapes.get(skip) != out_shape:
                continue
            nodes = dominated[maker.name]
            upstream = (nx.ancestors(dag, skip_maker.name) | {skip_maker.name}) if skip_maker else set()
            if nodes & upstream or not any(_is_weighted(graph, n) for n in nodes):
                continue
            if any(o in graph.outputs for n in nodes for o in graph.node_by_name[n].outputs):
                continue
            if _reads_stream(graph, nodes, skip, upstream):
                branches.append(Branch(join.name, skip, exit_name, frozenset(nodes)))
    return branches


def _reads_stream(graph: Graph, nodes: set[str], skip: str, upstream: set[str]) -> bool:
    """Whether the branch reads ``skip`` or a tensor made upstream of it (the fork)."""
    for name in nodes:
        for tensor in graph.node_by_name[name].inputs:
            maker = graph.producer.get(tensor)
            if tensor == skip or (maker is not None and maker.name not in nodes and maker.name in upstream):
                return True
    return False


def gate_name(branch: Branch) -> str:
    """The gate's input name: one per branch (a projection block's join has two, its body and its shortcut)."""
    return f"depth_gate::{branch.join}::{branch.exit}"


def gate_branches(graph: Graph, branches: list[Branch]) -> onnx.ModelProto:
    """A copy of the model where each branch's output is multiplied by a scalar graph input
    (:func:`gate_name`): fed 1 the model is the original, fed 0 the branch is removed."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    joins: dict[str, list[Branch]] = {}
    for branch in branches:
        joins.setdefault(branch.join, []).append(branch)
    nodes = []
    for node in model.graph.node:
        for branch in joins.get(node.name, []):
            gated = f"{branch.exit}::gated"
            nodes.append(helper.make_node("Mul", [branch.exit, gate_name(branch)], [gated], name=f"{gated}::mul"))
            node.input[list(node.input).index(branch.exit)] = gated
            model.graph.input.append(helper.make_tensor_value_info(gate_name(branch), graph.dtypes[branch.exit], []))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def remove_branches(graph: Graph, branches: list[Branch]) -> onnx.ModelProto:
    """A copy of the model without ``branches``: each join becomes an Identity of its skip input;
    nodes and initializers nothing uses any more are dropped."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    joins = {b.join: b for b in branches}
    gone = set().union(*(b.nodes for b in branches)) if branches else set()
    kept = []
    for node in model.graph.node:
        if node.name in gone:
            continue
        if node.name in joins:
            node = helper.make_node("Identity", [joins[node.name].skip], list(node.output), name=node.name)
        kept.append(node)
    outputs = {o.name for o in model.graph.output}
    while True:  # drop what only the removed branches read (rotary tables of removed attention, ...)
        used = {name for node in kept for name in node.input} | outputs
        live = [node for node in kept if any(o in used for o in node.output)]
        if len(live) == len(kept):
            break
        kept = live
    del model.graph.node[:]
    model.graph.node.extend(kept)
    keep_initializers(model.graph, used)
    del model.graph.value_info[:]
    return model
