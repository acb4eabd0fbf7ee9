"""Element-wise ops: every axis maps to itself; binary ops follow numpy broadcasting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import couple_broadcast, couple_same
from .registry import Coupler, OpRule, each_output, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Unary", "Broadcast"]

UNARY_OPS = (
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Atan",
    "Not", "IsNaN", "IsInf", "Cast", "Identity", "Dropout", "Clip", "Shrink",
)
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "PRelu",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
    "BitShift",
)


@register_op(*UNARY_OPS)
class Unary(OpRule):
    """``y = f(x)`` element by element: channel i of x is channel i of y (and of a Dropout mask).
    Extra inputs (Clip bounds, Dropout ratio) are scalars and couple nothing."""

    summary = "element-wise: every axis identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        for out in each_output(node):
            couple_same(c, node.inputs[0], out)


@register_op(*BROADCAST_OPS)
class Broadcast(OpRule):
    """Binary/variadic element-wise ops. A constant operand is sliced with the channels it
    multiplies; a size-1 (broadcast) axis couples nothing."""

    summary = "element-wise with broadcasting; constant operands sliced"

    def couple(self, node: "Node", c: Coupler) -> None:
        couple_broadcast(c, node.inputs, node.outputs[0])

    def added_bias(self, node: "Node", name: str) -> str | None:
        """An Add's other operand."""
        others = [n for n in node.inputs if n != name]
        return others[0] if node.op_type == "Add" and len(others) == 1 else None
