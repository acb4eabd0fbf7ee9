"""Control flow. The nodes inside subgraphs are analysed like any other
(:mod:`spa_compiler.subgraphs`): they read outer-scope tensors by name. What crosses a
subgraph's boundary is coupled here, exactly:

* ``If``: output k *is* output k of whichever branch ran, so every axis of it couples with the
  same axis of both branches' output k.
* ``Loop``: carried value k is one tensor seen four ways: the initial value (input ``2 + k``),
  the body's input ``2 + k`` and output ``1 + k``, and the final value (output k); every axis of
  the four couples, or, when their shapes differ (a value that grows), none does. A scan output
  stacks the body's per-iteration value along a new first axis.
* ``Scan`` (opset 9+): states as a Loop's carried values; scan input j is sliced along
  ``scan_input_axes[j]`` into the body's input (the other axes couple in order); scan output j
  stacks the body's output along ``scan_output_axes[j]``.

Anything else on a boundary (iteration counts, conditions) is blocked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import couple_same
from .registry import Coupler, OpRule, Unsupported, normalize_axis, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["If", "Loop", "Scan"]


@register_op("If")
class If(OpRule):
    """Output k couples, axis by axis, with output k of both branches; the outer-scope tensors
    the branches read are coupled by the nodes that read them (the analysis leaves them to those)."""

    summary = "output k = output k of each branch (every axis); branches analysed as part of the graph"

    def couple(self, node: "Node", c: Coupler) -> None:
        _require_analysed(node)
        for k, out in enumerate(node.outputs):
            for branch in (node.attr("then_branch")[0], node.attr("else_branch")[0]):
                inner = branch.output[k].name
                if out and c.shape(inner) == c.shape(out):
                    couple_same(c, out, inner)


def _require_analysed(node: "Node") -> None:
    if not node.inner_nodes_analysed:
        raise Unsupported("its subgraphs repeat names defined elsewhere, so they are not analysed")


def _known_shape(c: Coupler, name: str) -> tuple[int, ...] | None:
    try:
        return c.shape(name)
    except Unsupported:
        return None


def _couple_state(c: Coupler, names: list[str]) -> None:
    """One value seen under several names (initial, body input, body output, final): every axis
    couples when all shapes are known and equal, else nothing does."""
    names = [n for n in names if n]
    shapes = {_known_shape(c, n) for n in names}
    if len(shapes) == 1 and None not in shapes:
        for other in names[1:]:
            couple_same(c, names[0], other)


def _couple_stacked(c: Coupler, stacked: str, element: str, axis: int) -> None:
    """``stacked`` holds ``element``'s values along its extra axis ``axis``; the other axes couple
    in order when their sizes agree."""
    outer, inner = _known_shape(c, stacked), _known_shape(c, element)
    if outer is None or inner is None or len(outer) != len(inner) + 1:
        return
    axis = normalize_axis(axis, len(outer))
    others = [k for k in range(len(outer)) if k != axis]
    if [outer[k] for k in others] == list(inner):
        for inner_axis, outer_axis in enumerate(others):
            c.couple(element, inner_axis, stacked, outer_axis)


@register_op("Loop")
class Loop(OpRule):
    """Carried values couple through the body (all four names, every axis); scan outputs stack
    the body's values along a new first axis."""

    summary = "carried values coupled through the body; scan outputs stacked on axis 0"

    def couple(self, node: "Node", c: Coupler) -> None:
        _require_analysed(node)
        body = node.attr("body")[0]
        carried = len(node.inputs) - 2
        for k in range(carried):
            final = node.outputs[k] if k < len(node.outputs) else ""
            _couple_state(c, [node.inputs[2 + k], body.input[2 + k].name, body.output[1 + k].name, final])
        for j, out in enumerate(node.outputs[carried:]):
            if out:
                _couple_stacked(c, out, body.output[1 + carried + j].name, 0)


@register_op("Scan", opsets=(9, 23))
class Scan(OpRule):
    """States couple through the body; scan inputs are sliced and scan outputs stacked along
    their scan axes, the other axes coupled in order."""

    summary = "states coupled through the body; scan inputs/outputs coupled off their scan axes"

    def couple(self, node: "Node", c: Coupler) -> None:
        _require_analysed(node)
        body = node.attr("body")[0]
        scan_inputs = int(node.attr("num_scan_inputs"))
        states = len(node.inputs) - scan_inputs
        scan_outputs = len(body.output) - states
        input_axes = node.attr("scan_input_axes") or [0] * scan_inputs
        output_axes = node.attr("scan_output_axes") or [0] * scan_outputs
        for k in range(states):
            final = node.outputs[k] if k < len(node.outputs) else ""
            _couple_state(c, [node.inputs[k], body.input[k].name, body.output[k].name, final])
        for j in range(scan_inputs):
            _couple_stacked(c, node.inputs[states + j], body.input[states + j].name, input_axes[j])
        for j, out in enumerate(node.outputs[states:]):
            if out:
                _couple_stacked(c, out, body.output[states + j].name, output_axes[j])
