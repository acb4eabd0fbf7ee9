"""Ops with weights: Conv, ConvTranspose, Gemm, MatMul. Their weight output axes are the roots.

Grouped convolutions are pruned one of two exact ways, whichever gives more, finer units:

* *whole groups* (when there are at least as many groups as output channels per group, e.g.
  depthwise or ResNeXt): group ``j`` reads input channels ``j*Ci/g .. (j+1)*Ci/g - 1`` and writes
  output channels ``j*Co/g .. (j+1)*Co/g - 1`` and nothing else, so removing all of them deletes
  an independent sub-convolution; the rewrite lowers ``group``;
* *positions within groups* (few wide groups, e.g. AlexNet's two): output channel ``j*Co/g + k``
  leaves together with the same position k of every other group, and input channel
  ``j*Ci/g + t`` with position t of every group and with element t of W's input axis; every group
  shrinks alike and ``group`` stays.

MACs: Conv ``= |Y| * |W| / Co`` (each output element costs ``Ci/g * prod(kernel)``),
ConvTranspose ``= |X| * |W| / Ci``, Gemm and MatMul ``= |Y| * K``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from .common import couple_broadcast, input_at
from .registry import Coupler, OpRule, Rewriter, WeightView, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Conv", "ConvTranspose", "Gemm", "MatMul"]


def by_whole_groups(ci: int, co: int, groups: int) -> bool:
    """Whether a grouped conv is pruned by whole groups (else by positions within groups)."""
    return groups >= co // groups


def _couple_whole_groups(c: Coupler, x: str, y: str, groups: int) -> None:
    """Put all input and output channels of each group in one unit."""
    ci, co = c.shape(x)[1], c.shape(y)[1]
    cig, cog = ci // groups, co // groups
    c.couple(x, 1, y, 1, np.arange(ci), (np.arange(ci) // cig) * cog)
    c.couple(y, 1, y, 1, np.arange(co), (np.arange(co) // cog) * cog)


def _couple_positions(c: Coupler, a: str, b: str, b_axis: int, groups: int) -> None:
    """Couple channel ``j*n/g + t`` of ``a`` with element t of ``b``'s axis, for every group j."""
    n = c.shape(a)[1]
    c.couple(a, 1, b, b_axis, np.arange(n), np.arange(n) % (n // groups))


def _tag_weight(c: Coupler, w: str, out_axis: int | None, in_axis: int) -> None:
    """Tag a matrix weight's slabs for the criteria; its input axis reads the layer's input."""
    if out_axis is not None:
        c.tag(w, out_axis, "weight")
    c.tag(w, in_axis, "weight")
    c.tag(w, in_axis, "consumer")


class _ConvBase(OpRule):
    """What Conv and ConvTranspose share: batch, bias, weight tags and the ``group`` rewrite.
    ``bias_slot``: the input holding the bias (None: the op has none)."""

    bias_slot: int | None = 2

    def couple(self, node: "Node", c: Coupler) -> None:
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        groups = int(node.attr("group", 1))
        c.couple(x, 0, y, 0)
        self._couple_channels(c, x, w, y, groups)
        bias = input_at(node, self.bias_slot) if self.bias_slot is not None else ""
        if bias:
            c.couple(bias, 0, y, 1)
        c.tag(w, 0, "weight")
        c.tag(w, 1, "weight")

    def _couple_channels(self, c: Coupler, x: str, w: str, y: str, groups: int) -> None:
        raise NotImplementedError

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        groups = int(node.attr("group", 1))
        x, y = node.inputs[0], node.outputs[0]
        if groups > 1 and by_whole_groups(r.old_shape(x)[1], r.old_shape(y)[1], groups):
            per_group = r.old_shape(x)[1] // groups
            r.set_attr(node, "group", r.new_shape(x)[1] // per_group)


@register_op("Conv")
class Conv(_ConvBase):
    """``Y[n, o] = sum_i W[o, i] * X[n, g(o)*Ci/g + i] + B[o]``: W axis 0 and B couple with Y's
    channels; with one group W axis 1 couples with X's channels."""

    summary = "W axis 0 = Y channels (root); W axis 1 = X channels; grouped/depthwise by whole groups"

    def _couple_channels(self, c: Coupler, x: str, w: str, y: str, groups: int) -> None:
        c.couple(w, 0, y, 1)
        c.root(w, 0)
        if groups == 1:
            c.couple(x, 1, w, 1)
            c.tag(w, 1, "consumer")
        elif by_whole_groups(c.shape(x)[1], c.shape(y)[1], groups):
            _couple_whole_groups(c, x, y, groups)
        else:
            _couple_positions(c, x, w, 1, groups)
            _couple_positions(c, y, y, 1, groups)
            c.tag(w, 1, "consumer")

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        y, w = node.outputs[0], node.inputs[1]
        return [(y, k) for k in range(len(shape(y)))] + [(w, k) for k in range(1, len(shape(w)))]

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """``W[o, i, k...]`` of a one-group convolution over channels-first X."""
        if node.inputs[1] != weight or int(node.attr("group", 1)) != 1:
            return None
        return WeightView(shape[0], 1, tuple(shape[2:]), input_at(node, 2) or None)


@register_op("ConvTranspose")
class ConvTranspose(_ConvBase):
    """``W[Ci, Co/g, k...]``: W axis 0 couples with X's channels, axis 1 with Y's channels."""

    summary = "W axis 0 = X channels; W axis 1 = Y channels (root); grouped by whole groups"

    def _couple_channels(self, c: Coupler, x: str, w: str, y: str, groups: int) -> None:
        c.couple(w, 0, x, 1)
        c.tag(w, 0, "consumer")
        if groups == 1:
            c.couple(w, 1, y, 1)
            c.root(w, 1)
        elif by_whole_groups(c.shape(x)[1], c.shape(y)[1], groups):
            _couple_whole_groups(c, x, y, groups)
            c.root(w, 0)
        else:
            _couple_positions(c, y, w, 1, groups)
            _couple_positions(c, x, x, 1, groups)
            c.root(w, 1)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        super().rewrite(node, r)
        output_shape = node.attr("output_shape")
        y = node.outputs[0]
        if output_shape and len(output_shape) == len(r.old_shape(y)):
            r.set_attr(node, "output_shape", [output_shape[0], r.new_shape(y)[1], *output_shape[2:]])

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        x, w = node.inputs[0], node.inputs[1]
        return [(x, k) for k in range(len(shape(x)))] + [(w, k) for k in range(1, len(shape(w)))]

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """``W[i, o, k...]`` of a one-group transposed convolution over channels-first X: input
        position ``p`` adds ``W[:, o, k] · X[:, p]`` to output ``o`` at ``p s + k`` (less the pads),
        one linear map of ``X[:, p]`` per kernel position. Where kernel positions overlap
        (kernel > stride) an output sums several, and the statistics treat each on its own. The
        view has no bias: ``B[o]`` is added once to every output, which no kernel position's row
        owns (a constant that one removed channel adds through ``W[c, o, k]`` differs by ``k``),
        so compensation changes the weights alone."""
        if node.inputs[1] != weight or int(node.attr("group", 1)) != 1:
            return None
        return WeightView(shape[1], 1, tuple(shape[2:]), None, patches=False)


@register_op("Gemm")
class Gemm(OpRule):
    """``Y = alpha * A' B' + beta * C`` with ``A'`` = A or Aᵀ, ``B'`` = B or Bᵀ: A's K axis couples
    with B's K axis, B's N axis with Y's columns (a root when B is constant), C broadcasts."""

    summary = "A[M,K] x B[K,N] (+C): K coupled, N = Y columns (root when B is a weight)"

    def couple(self, node: "Node", c: Coupler) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        a_m, a_k = (1, 0) if node.attr("transA", 0) else (0, 1)
        b_k, b_n = (1, 0) if node.attr("transB", 0) else (0, 1)
        c.couple(a, a_m, y, 0)
        c.couple(a, a_k, b, b_k)
        c.couple(b, b_n, y, 1)
        couple_broadcast(c, [input_at(node, 2)], y)
        if c.is_constant(b):
            c.root(b, b_n)
            _tag_weight(c, b, b_n, b_k)
        if c.is_constant(a):
            c.root(a, a_m)
            _tag_weight(c, a, a_m, a_k)

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        a, y = node.inputs[0], node.outputs[0]
        return [(y, 0), (y, 1), (a, 0 if node.attr("transA", 0) else 1)]

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """B (K axis ``axis``) applied to the rows of an untransposed A, plus C."""
        if node.inputs[1] != weight or node.attr("transA", 0):
            return None
        return WeightView(shape[1 - axis], -1, (), input_at(node, 2) or None)


@register_op("MatMul")
class MatMul(OpRule):
    """numpy matmul ``Y[..., M, N] = A[..., M, K] @ B[..., K, N]`` with broadcast batch axes;
    a 1-D operand has no M (or N) axis. A constant 2-D B is a weight whose N axis is a root."""

    summary = "A[..,M,K] @ B[..,K,N]: K coupled, batch broadcast, N root when B is a weight"

    def couple(self, node: "Node", c: Coupler) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ra, rb, ry = len(c.shape(a)), len(c.shape(b)), len(c.shape(y))
        c.couple(a, ra - 1, b, max(rb - 2, 0))
        if ra >= 2:
            c.couple(a, ra - 2, y, ry - 2 if rb >= 2 else ry - 1)
        if rb >= 2:
            c.couple(b, rb - 1, y, ry - 1)
        batch = ry - (ra >= 2) - (rb >= 2)  # Y's broadcast axes: a 1-D operand adds no M (or N) axis
        self._couple_batch(c, a, ra, y, batch)
        self._couple_batch(c, b, rb, y, batch)
        if c.is_constant(b) and rb == 2:
            c.root(b, 1)
            _tag_weight(c, b, 1, 0)
        elif c.is_constant(b) and rb == 1:
            _tag_weight(c, b, None, 0)
        if c.is_constant(a) and ra == 2:
            c.root(a, 0)
            _tag_weight(c, a, 0, 1)

    @staticmethod
    def _couple_batch(c: Coupler, x: str, rx: int, y: str, batch: int) -> None:
        """Couple x's batch axes with the last of Y's ``batch`` leading axes (numpy broadcasting)."""
        x_shape, y_shape = c.shape(x), c.shape(y)
        for k in range(rx - 2):
            y_axis = batch - (rx - 2) + k
            if y_axis >= 0 and x_shape[k] == y_shape[y_axis]:
                c.couple(x, k, y, y_axis)

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        a, y = node.inputs[0], node.outputs[0]
        return [(y, k) for k in range(len(shape(y)))] + [(a, len(shape(a)) - 1)]

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """A 2-D B ``[K, N]`` applied to A's last axis (a bias, if any, is a later Add)."""
        if node.inputs[1] != weight or len(shape) != 2:
            return None
        return WeightView(shape[1], -1)
