"""Recurrent layers: RNN, GRU and LSTM, pruned by hidden unit with their gates coupled.

With ``G`` gates (RNN 1, GRU 3, LSTM 4) and hidden size ``H``, direction ``d`` computes for
hidden unit ``j`` and gate ``g``

    gate[g, j] = f(W[d, g*H + j, :] · x_t + R[d, g*H + j, :] · h_{t-1} + Wb[d, g*H + j] + Rb[d, g*H + j])

and writes ``h_t[j]`` to ``Y[..., d, ..., j]`` (``Y_h``/``Y_c`` hold the last step). Hidden unit
``j`` therefore owns rows ``g*H + j`` of W and R (every gate), elements ``g*H + j`` and
``G*H + g*H + j`` of B, ``g*H + j`` of the peepholes P, element ``j`` of the initial states and of
the outputs' hidden axis, in every direction at once (one ``hidden_size`` serves both). Other
units read it only through column ``j`` of R (axis 2, tagged ``consumer``) and through whatever
consumes Y, so a unit whose R column and downstream readers are zero can leave without changing
any other unit: exact. Tensors are ``[seq, batch, ...]`` (layout 0); batch-first layout 1, which
onnxruntime does not run, is a barrier. The input side is an ordinary consumer: element ``i`` of x's feature axis
is column ``i`` of W (axis 2).

MACs: ``seq * dirs * batch * G*H * (input + H)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .common import input_at
from .registry import Coupler, OpRule, Rewriter, Unsupported, WeightView, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Recurrent"]

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_INITIAL_STATES = (5, 6)  # initial_h, initial_c
_PEEPHOLES = 7


@register_op("RNN", "GRU", "LSTM")
class Recurrent(OpRule):
    """Hidden units with every gate's rows of W, R, B (and P, initial states) coupled; W's input
    axis couples with x's features; ``hidden_size`` rewritten."""

    summary = "hidden units (all gates of W, R, B, P, states, Y) coupled; W axis 2 = x features"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
        y = self._hidden_output(node)
        if int(node.attr("layout", 0)):
            raise Unsupported("batch-first layout (layout = 1) is not supported")
        gates = GATES[node.op_type]
        hidden = c.shape(r)[2]
        per_gate = np.arange(gates * hidden) % hidden
        c.couple(w, 1, y[0], y[1], None, per_gate)
        c.couple(r, 1, y[0], y[1], None, per_gate)
        c.couple(r, 2, y[0], y[1])
        bias = input_at(node, 3)
        if bias:
            c.couple(bias, 1, y[0], y[1], None, np.arange(2 * gates * hidden) % hidden)
        peepholes = input_at(node, _PEEPHOLES)
        if peepholes:
            c.couple(peepholes, 1, y[0], y[1], None, np.arange(3 * hidden) % hidden)
        states = [input_at(node, k) for k in _INITIAL_STATES] + [o for o in node.outputs[1:] if o]
        for state in (s for s in states if s):
            c.couple(state, 2, y[0], y[1])
            c.couple(state, 1, x, 1)
        c.couple(x, 2, w, 2)
        if node.outputs[0]:
            c.couple(x, 0, node.outputs[0], 0)
            c.couple(x, 1, node.outputs[0], 2)
        c.root(w, 1)
        for name, axis in ((w, 1), (r, 1), (w, 2), (r, 2)):
            c.tag(name, axis, "weight")
        c.tag(w, 2, "consumer")
        c.tag(r, 2, "consumer")

    @staticmethod
    def _hidden_output(node: "Node") -> tuple[str, int]:
        """A tensor and axis that hold the hidden units: Y's last axis, else Y_h's."""
        return (node.outputs[0], 3) if node.outputs[0] else (node.outputs[1], 2)

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """W ``[dirs, G*H, input]`` applied to x's last axis at every step, in every direction:
        ``dirs * G*H`` outputs (the gates' pre-activations ``W x_t``), their bias the first
        ``G*H`` of each direction's row of B (``Wb``; ``Rb``, the rest, is the recurrence's)."""
        if node.inputs[1] != weight or axis != 2:
            return None
        return WeightView(shape[0] * shape[1], -1, bias=input_at(node, 3) or None, bias_columns=shape[1])

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        r.set_attr(node, "hidden_size", r.new_shape(node.inputs[2])[2])

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        """Sequence, directions, batch and gate rows, then the two summed fan-ins (x, h)."""
        x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
        return [(x, 0), (w, 0), (x, 1), (w, 1), (w, 2), (r, 2)]

    def macs_value(self, sizes: Sequence[float]) -> float:
        return math.prod(sizes[:-2]) * (sizes[-2] + sizes[-1])
