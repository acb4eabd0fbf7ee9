"""Ops that act within each channel (pooling, resizing, padding) or reduce/normalise over axes.

Batch and channel axes map to themselves; spatial axes change size and are never pruned. An
axis that is reduced or normalised over (Reduce*, Softmax) is a barrier: removing one of its
elements would change every output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import couple_except, couple_same, input_at, int_param, normalized_axes
from .registry import Coupler, OpRule, Rewriter, Unsupported, normalize_axis, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Pool", "RoiPool", "Reduce", "Softmax", "Resize", "Pad", "DepthToSpace", "SpaceToDepth"]


@register_op("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
             "GlobalLpPool")
class Pool(OpRule):
    """Pooling windows stay within a channel. MaxPool's optional Indices output encodes channel
    offsets in its values, so when it is used the channel axis is a barrier."""

    summary = "batch and channel identity; spatial axes resized"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        has_indices = len(node.outputs) > 1 and bool(node.outputs[1])
        couple_same(c, x, y, [0] if has_indices else [0, 1])


@register_op("MaxRoiPool")
class RoiPool(OpRule):
    """``[N, C, H, W]`` and regions ``[R, 5]`` give ``[R, C, ph, pw]``: channels are identity."""

    summary = "channel axis identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        c.couple(node.inputs[0], 1, node.outputs[0], 1)


@register_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
             "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
class Reduce(OpRule):
    """Kept axes are identity; reduced axes are barriers. Axes come from the attribute (older
    opsets) or the second input (ReduceSum 13+, all reductions 18+).

    With ``--prune-hidden`` the statistics of a LayerNorm written out as ops let their one
    reduced axis lose elements (lossy: mean and variance are then taken over the kept elements):
    a ReduceMean over the last axis, and a ReduceMean over any one axis, or a ReduceSum followed
    by a division by the axis size (``ReduceSum(x) / N``, ``ReduceSum(x) * (1/N)``, as JAX and TF
    exports write a mean), that is a LayerNorm statistic: its mean is subtracted from its input
    (``x - mean``), or it reduces the square of a centred tensor (``(x - mean)^2``, ``d * d``) or
    of a tensor that is centred elsewhere (``E[x^2] - E[x]^2``). The divisor N of a ReduceSum is
    rewritten to the kept size."""

    summary = "kept axes identity; reduced axes blocked (LayerNorm statistics lossy with --prune-hidden)"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [int(node.attr("axis", 0))]
        else:
            axes = int_param(node, c, "axes", 1)
        if axes is None:
            if node.attr("noop_with_empty_axes", 0):
                couple_same(c, x, y)
            return  # all axes reduced
        reduced = set(normalized_axes(axes, rank))
        keepdims = int(node.attr("keepdims", 1))
        if c.prune_hidden and keepdims and len(reduced) == 1 and _is_norm_statistic(node, c, rank):
            (axis,) = reduced
            c.free(x, axis)  # a written-out LayerNorm's statistics: lossy, asked for
            c.tag(x, axis, "lossy")
        out_axis = 0
        for axis in range(rank):
            if axis not in reduced:
                c.couple(x, axis, y, out_axis)
            if axis not in reduced or keepdims:
                out_axis += 1

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        x = node.inputs[0]
        divisor = _mean_divisor(node, r, r.old_shape(x)) if node.op_type == "ReduceSum" else None
        if divisor is None:
            return
        consumer, inverse = divisor
        (axis,) = _reduced_axes(node, r, len(r.old_shape(x)))
        kept = r.new_shape(x)[axis]
        if kept == r.old_shape(x)[axis]:
            return
        value = r.constant(consumer.inputs[1])
        r.set_input(consumer, 1, np.full(value.shape, 1.0 / kept if inverse else kept, dtype=value.dtype))


def _reduced_axes(node: "Node", c: Coupler | Rewriter, rank: int) -> list[int] | None:
    """The axes a reduction reduces, None when all or unknown (computed at run time)."""
    try:
        axes = int_param(node, c, "axes", 1)
    except Unsupported:
        return None
    return None if axes is None else normalized_axes(axes, rank)


def _mean_divisor(node: "Node", c: Coupler | Rewriter, shape: tuple[int, ...]) -> tuple["Node", bool] | None:
    """For a ReduceSum over one axis of size N (of input ``shape``) whose only consumer divides
    it by N (or multiplies it by 1/N), a scalar constant second operand: that consumer and
    whether the constant is 1/N."""
    consumers = c.consumers(node.outputs[0])
    axes = _reduced_axes(node, c, len(shape))
    if len(consumers) != 1 or axes is None or len(axes) != 1:
        return None
    (consumer,) = consumers
    if consumer.op_type not in ("Div", "Mul") or len(consumer.inputs) != 2 or consumer.inputs[0] != node.outputs[0]:
        return None
    divisor = consumer.inputs[1]
    if not c.is_constant(divisor) or c.constant(divisor).size != 1:
        return None
    inverse = consumer.op_type == "Mul"
    size = shape[axes[0]]
    expected = 1.0 / size if inverse else float(size)
    return (consumer, inverse) if np.isclose(float(c.constant(divisor).reshape(-1)[0]), expected, rtol=1e-6) else None


def _mean_of(node: "Node", c: Coupler) -> str | None:
    """The tensor holding the mean a ReduceMean or ReduceSum (with its divisor) computes."""
    if node.op_type == "ReduceMean":
        return node.outputs[0]
    if node.op_type == "ReduceSum":
        divisor = _mean_divisor(node, c, c.shape(node.inputs[0]))
        return divisor[0].outputs[0] if divisor else None
    return None


def _centres(name: str, mean: str | None, c: Coupler) -> bool:
    """Whether some consumer computes ``name - mean``."""
    return mean is not None and any(n.op_type == "Sub" and n.inputs == [name, mean] for n in c.consumers(name))


def _is_centred(name: str, c: Coupler) -> bool:
    """``name`` is ``b - mean(b)``, or its own mean is subtracted from it somewhere."""
    if any(_centres(name, _mean_of(n, c), c) for n in c.consumers(name) if n.op_type in ("ReduceMean", "ReduceSum")):
        return True
    sub = c.producer(name)
    if sub is None or sub.op_type != "Sub" or len(sub.inputs) != 2:
        return False
    mean_node = c.producer(sub.inputs[1])
    if mean_node is not None and mean_node.op_type in ("Div", "Mul"):
        mean_node = c.producer(mean_node.inputs[0])
    return mean_node is not None and mean_node.inputs[0] == sub.inputs[0] and _mean_of(mean_node, c) == sub.inputs[1]


def _squared(name: str, c: Coupler) -> str | None:
    """``a`` when ``name`` is ``a^2`` (Pow by the constant 2) or ``a * a``."""
    node = c.producer(name)
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Mul" and a == b:
        return a
    if node.op_type == "Pow" and c.is_constant(b) and c.constant(b).size == 1 and float(np.asarray(c.constant(b)).reshape(-1)[0]) == 2.0:
        return a
    return None


def _is_norm_statistic(node: "Node", c: Coupler, rank: int) -> bool:
    """Whether a one-axis ReduceMean/ReduceSum computes a LayerNorm's mean or variance (see
    :class:`Reduce`); a ReduceMean over the last axis always counts."""
    x = node.inputs[0]
    mean = _mean_of(node, c)
    if mean is None:
        return False
    if node.op_type == "ReduceMean" and _reduced_axes(node, c, rank) == [rank - 1]:
        return True
    if _centres(x, mean, c):
        return True
    base = _squared(x, c)
    return base is not None and _is_centred(base, c)


@register_op("Softmax", "LogSoftmax", "Hardmax")
class Softmax(OpRule):
    """Normalises over ``axis`` (opset 13+) or, before opset 13, over the input flattened from
    ``axis`` on: those axes are barriers, the others identity."""

    summary = "softmax axis (and, before opset 13, all following axes) blocked"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        if c.opset >= 13:
            axis = normalized_axes([int(node.attr("axis", -1))], rank)[0]
            couple_except(c, x, y, {axis})
        else:
            axis = normalized_axes([int(node.attr("axis", 1))], rank)[0]
            couple_same(c, x, y, range(axis))


@register_op("Resize", "Upsample")
class Resize(OpRule):
    """Interpolation within each channel: an axis whose size does not change and whose scale,
    when scales are given, is 1 is identity; resized axes are not pruned (a scale of 1.1 keeps 8
    elements 8 but resamples them). Scales and sizes must be constants."""

    summary = "unresized axes identity (scale 1); sizes input rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        for name in node.inputs[1:]:
            if name and not c.is_constant(name):
                raise Unsupported(f"its scales/sizes input '{name}' is computed at run time")
        x_shape, y_shape = c.shape(x), c.shape(y)
        scales = self._scales(node, c, len(x_shape))
        unchanged = [k for k in range(len(x_shape)) if x_shape[k] == y_shape[k] and scales.get(k, 1.0) == 1.0]
        couple_same(c, x, y, unchanged)

    @staticmethod
    def _scales(node: "Node", c: Coupler, rank: int) -> dict[int, float]:
        """The scale of each axis that has one: Upsample's attribute (before opset 9), else the
        scales input (Resize from opset 11 takes it after ``roi``), for ``axes`` or all axes."""
        if "scales" in node.attrs:
            values = list(node.attr("scales"))
        else:
            name = input_at(node, 2 if node.op_type == "Resize" and c.opset >= 11 else 1)
            values = c.constant(name).reshape(-1).tolist() if name else []
        axes = [normalize_axis(a, rank) for a in node.attr("axes") or range(rank)]
        return dict(zip(axes, map(float, values)))

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        sizes = input_at(node, 3) if node.op_type == "Resize" else ""
        if sizes and r.constant(sizes).size:
            y = node.outputs[0]
            axes = node.attr("axes") or range(len(r.old_shape(y)))
            new = r.new_shape(y)
            r.set_input(node, 3, np.asarray([new[a] for a in axes], dtype=np.int64))


@register_op("Pad")
class Pad(OpRule):
    """Unpadded axes are identity. On a padded axis, input element i is output element
    ``pad_begin + i`` in constant mode; edge/reflect modes copy neighbouring elements into the
    padding, so a padded axis in those modes is a barrier."""

    summary = "unpadded axes identity; constant padding maps interior elements"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        pads = int_param(node, c, "pads", 1) or [0] * (2 * rank)
        axes_given = int_param(node, c, "axes", 3) if c.opset >= 18 else None
        axes = normalized_axes(axes_given, rank) if axes_given else list(range(rank))
        begin = dict(zip(axes, pads[: len(axes)]))
        end = dict(zip(axes, pads[len(axes):]))
        constant_mode = node.attr("mode", "constant") == "constant"
        for axis in range(rank):
            b, e = begin.get(axis, 0), end.get(axis, 0)
            if b == 0 and e == 0:
                c.couple(x, axis, y, axis)
            elif constant_mode and b >= 0 and e >= 0:
                n = c.shape(x)[axis]
                c.couple(x, axis, y, axis, np.arange(n), b + np.arange(n))


@register_op("DepthToSpace")
class DepthToSpace(OpRule):
    """``[N, C*b*b, H, W] -> [N, C, H*b, W*b]``. Output channel c reads input channels
    ``(i*b + j)*C + c`` (DCR mode) or ``c*b*b + i*b + j`` (CRD mode) for all i, j < b; removing c
    removes all of those and keeps the layout of the rest."""

    summary = "output channel c couples with its b*b input channels (DCR and CRD)"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        b = int(node.attr("blocksize"))
        c_in, c_out = c.shape(x)[1], c.shape(y)[1]
        source = np.arange(c_in)
        target = source // (b * b) if node.attr("mode", "DCR") == "CRD" else source % c_out
        c.couple(x, 0, y, 0)
        c.couple(x, 1, y, 1, source, target)


@register_op("SpaceToDepth")
class SpaceToDepth(OpRule):
    """``[N, C, H, W] -> [N, C*b*b, H/b, W/b]``; output channel ``(i*b + j)*C + c`` comes from
    input channel c."""

    summary = "input channel c couples with its b*b output channels"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        c_in, c_out = c.shape(x)[1], c.shape(y)[1]
        c.couple(x, 0, y, 0)
        c.couple(y, 1, x, 1, np.arange(c_out), np.arange(c_out) % c_in)
