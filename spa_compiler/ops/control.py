"""Control flow. An ``If`` runs one of two subgraphs whose nodes the analysis sees like any other
(:mod:`spa_compiler.subgraphs`); the branches read outer-scope tensors by name, and output k of
the If *is* output k of whichever branch ran, so every axis of it couples with the same axis of
both branches' output k. Nothing else crosses the boundary. Loop and Scan have no rule: their
carried values and scan slices are barriers, while channels that start and end inside their
bodies still prune.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import couple_same
from .registry import Coupler, OpRule, Unsupported, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["If"]


@register_op("If")
class If(OpRule):
    """Output k couples, axis by axis, with output k of both branches; the outer-scope tensors
    the branches read are coupled by the nodes that read them (the analysis leaves them to those)."""

    summary = "output k = output k of each branch (every axis); branches analysed as part of the graph"

    def couple(self, node: "Node", c: Coupler) -> None:
        if not node.inner_nodes_analysed:
            raise Unsupported("its branches repeat names defined elsewhere, so they are not analysed")
        for k, out in enumerate(node.outputs):
            for branch in (node.attr("then_branch")[0], node.attr("else_branch")[0]):
                inner = branch.output[k].name
                if out and c.shape(inner) == c.shape(out):
                    couple_same(c, out, inner)
