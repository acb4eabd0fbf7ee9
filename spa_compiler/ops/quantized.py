"""Quantization ops: QDQ (QuantizeLinear/DequantizeLinear) and the dynamic integer ops.

``QuantizeLinear``: ``y = saturate(round(x / s) + z)``; ``DequantizeLinear``: ``y = (x - z) * s``.
Both are element-wise: axis k of x is axis k of y. A per-tensor scale and zero point (one
element) apply to every channel alike and stay untouched; a per-axis one (1-D, one entry per
index of ``axis``) is sliced with that axis. So channel i of the output is computed from channel
i of the input and its own parameters only, and removing it changes no other channel.

``DynamicQuantizeLinear``: ``s = (max(0, max x) - min(0, min x)) / 255``, ``z = round(-min(0, min x) / s)``,
``y = saturate(round(x / s) + z)``: element-wise with scalar parameters computed from the whole
tensor. The range always includes 0, so channels that are zero do not move it: the pruned
model computes what the original computes when the removed channels are zero (DESIGN
invariant 3), and a removed channel that was not zero changes the scale as zeroing it would.

``MatMulInteger(A, B, a_zero, b_zero)``: ``Y = (A - a_zero) @ (B - b_zero)`` in int32, coupled as
MatMul; a per-column ``b_zero`` (``[N]``) is sliced with B's columns, a per-row ``a_zero``
(``[M]``) with A's rows. ``ConvInteger(x, w, x_zero, w_zero)``: ``Y = conv(x - x_zero, w - w_zero)``,
coupled as Conv; a per-output-channel ``w_zero`` (``[O]``) is sliced with the filters; ``x_zero``
is a scalar. Their float scales multiply the product afterwards (``Cast -> Mul``), through
ordinary element-wise rules. Their weight views (``input_weight``) are MatMul's and Conv's
(without a bias input): where the integer product reads ``DynamicQuantizeLinear(x)`` and the
weight's scale is known, statistics read the float ``x`` and compensation and the re-fit fit the
weight's float value, quantized again (:func:`spa_compiler.quantized.float_product`); criteria
rank the weights by ``(q - zero) * scale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import couple_same, input_at
from .linear import Conv, MatMul
from .registry import Coupler, OpRule, Unsupported, WeightView, normalize_axis, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["QuantizeDequantize", "DynamicQuantize", "MatMulInteger", "ConvInteger"]


def _couple_parameter(c: Coupler, param: str, target: str, axis: int, what: str) -> None:
    """A quantization parameter: one element (per tensor) couples nothing; a 1-D one with an
    entry per index of ``target``'s ``axis`` is sliced with it; anything else is not understood."""
    if not param:
        return
    shape = c.shape(param)
    if int(np.prod(shape)) == 1 and len(shape) <= 1:
        return
    if len(shape) != 1 or not 0 <= axis < len(c.shape(target)) or shape[0] != c.shape(target)[axis]:
        raise Unsupported(f"its {what} '{param}' of shape {list(shape)} is neither per tensor nor per axis {axis}")
    c.couple(param, 0, target, axis)


@register_op("QuantizeLinear", "DequantizeLinear", opsets=(10, 23))
class QuantizeDequantize(OpRule):
    """Element-wise; the scale and zero point sliced with ``axis`` when given per axis."""

    summary = "element-wise; per-axis scale and zero point sliced with their axis"

    def couple(self, node: "Node", c: Coupler) -> None:
        if int(node.attr("block_size", 0)):
            raise Unsupported("block-wise quantization is not rewritten")
        x, y = node.inputs[0], node.outputs[0]
        couple_same(c, x, y)
        axis = normalize_axis(int(node.attr("axis", 1)), len(c.shape(x)))
        _couple_parameter(c, input_at(node, 1), y, axis, "scale")
        _couple_parameter(c, input_at(node, 2), y, axis, "zero point")


@register_op("DynamicQuantizeLinear", opsets=(11, 23))
class DynamicQuantize(OpRule):
    """Element-wise on x; the scalar scale and zero point outputs couple nothing."""

    summary = "element-wise (range over the whole tensor includes 0)"

    def couple(self, node: "Node", c: Coupler) -> None:
        couple_same(c, node.inputs[0], node.outputs[0])


@register_op("MatMulInteger", opsets=(10, 23))
class MatMulInteger(MatMul):
    """MatMul on ``A - a_zero`` and ``B - b_zero``; per-row/per-column zero points sliced."""

    summary = "as MatMul; per-column b_zero_point sliced with N, per-row a_zero_point with M"

    def couple(self, node: "Node", c: Coupler) -> None:
        super().couple(node, c)
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = len(c.shape(a)), len(c.shape(b))
        if input_at(node, 2):
            if ra < 2 and int(np.prod(c.shape(input_at(node, 2)))) > 1:
                raise Unsupported("a per-row a_zero_point needs a matrix A")
            _couple_parameter(c, input_at(node, 2), a, max(ra - 2, 0), "a_zero_point")
        if input_at(node, 3):
            if rb > 2 and int(np.prod(c.shape(input_at(node, 3)))) > 1:
                raise Unsupported("a per-column b_zero_point on a batched B is not understood")
            _couple_parameter(c, input_at(node, 3), b, rb - 1, "b_zero_point")


@register_op("ConvInteger", opsets=(10, 23))
class ConvInteger(Conv):
    """Conv on ``x - x_zero`` and ``w - w_zero`` (no bias input); per-filter zero point sliced."""

    summary = "as Conv (no bias); per-output-channel w_zero_point sliced with the filters"
    bias_slot = None

    def couple(self, node: "Node", c: Coupler) -> None:
        super().couple(node, c)
        x_zero = input_at(node, 2)
        if x_zero and int(np.prod(c.shape(x_zero))) != 1:
            raise Unsupported("x_zero_point is not a scalar")
        _couple_parameter(c, input_at(node, 3), node.inputs[1], 0, "w_zero_point")

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        view = super().input_weight(node, weight, axis, shape)  # Conv's, whose input 2 is a bias
        return None if view is None else WeightView(view.outputs, view.channel_axis, view.kernel)  # here x_zero
