"""Normalisations. Per-channel ones (BatchNorm, InstanceNorm) slice their parameters with the
channels; GroupNormalization is pruned by whole groups; normalising *over* an axis (LRN across
channels, LayerNorm's normalised axes) makes that axis a barrier."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .common import couple_except, couple_same
from .registry import Coupler, OpRule, Rewriter, each_output, normalize_axis, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "LRN"]


@register_op("BatchNormalization")
class BatchNorm(OpRule):
    """``y[:, c] = scale[c] * (x[:, c] - mean[c]) / sqrt(var[c] + eps) + B[c]``: channel c of x, y
    and element c of every parameter (and of the training-mode statistics outputs) go together."""

    summary = "per-channel affine: parameters sliced with the channel axis"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        couple_same(c, x, y)
        for param in node.inputs[1:5]:
            c.couple(param, 0, y, 1)
        for stat in [o for o in node.outputs[1:] if o]:
            c.couple(stat, 0, y, 1)
        c.tag(node.inputs[1], 0, "bn_scale")


@register_op("InstanceNormalization")
class InstanceNorm(OpRule):
    """Normalises each (sample, channel) over its spatial axes: channels are independent."""

    summary = "per-channel over spatial axes: channel axis identity, scale/B sliced"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        couple_same(c, x, y, [0, 1])
        for param in node.inputs[1:3]:
            c.couple(param, 0, y, 1)


@register_op("GroupNormalization", opsets=(18, 23))
class GroupNorm(OpRule):
    """Normalises each group of ``C/G`` channels together, so a group leaves whole; scale and
    bias are per channel (opset 21) or per group (opset 18)."""

    summary = "whole groups of C/num_groups channels; num_groups rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        groups = int(node.attr("num_groups"))
        channels = c.shape(x)[1]
        per_group = channels // groups
        couple_same(c, x, y, [0, 1])
        c.couple(y, 1, y, 1, np.arange(channels), (np.arange(channels) // per_group) * per_group)
        for param in node.inputs[1:3]:
            if c.shape(param)[0] == channels:
                c.couple(param, 0, y, 1)
            else:
                c.couple(param, 0, y, 1, np.arange(groups), np.arange(groups) * per_group)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        x = node.inputs[0]
        per_group = r.old_shape(x)[1] // int(node.attr("num_groups"))
        r.set_attr(node, "num_groups", r.new_shape(x)[1] // per_group)


@register_op("LayerNormalization", opsets=(17, 23))
class LayerNorm(OpRule):
    """Normalises over axes ``axis..rank-1``: those axes are barriers, the leading axes identity
    (also for the optional Mean and InvStdDev outputs). With ``--prune-hidden`` a single
    normalised last axis is coupled through, with scale and bias: lossy, since mean and
    variance are then taken over the kept elements only."""

    summary = "leading axes identity; normalised axes blocked (coupled, lossy, with --prune-hidden)"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        axis = normalize_axis(int(node.attr("axis", -1)), rank)
        for out in each_output(node):
            couple_same(c, x, out, range(axis))
        if c.prune_hidden and axis == rank - 1:
            c.couple(x, axis, y, axis)
            c.tag(y, axis, "lossy")
            for param in node.inputs[1:3]:
                if param:
                    c.couple(param, len(c.shape(param)) - 1, y, axis)


@register_op("LRN")
class LRN(OpRule):
    """Local response normalisation sums squares over neighbouring channels: the channel axis
    is a barrier, the others are identity."""

    summary = "channel axis blocked (mixes neighbouring channels)"

    def couple(self, node: "Node", c: Coupler) -> None:
        couple_except(c, node.inputs[0], node.outputs[0], {1})
