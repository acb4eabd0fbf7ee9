"""onnxruntime's fused normalisations: SkipLayerNormalization and SkipSimplifiedLayerNormalization
(domain ``com.microsoft``), SimplifiedLayerNormalization (RMSNorm, ONNX domain) and
EmbedLayerNormalization (``com.microsoft``), and the fused activations BiasGelu and FastGelu.

All normalise over the last (hidden) axis, so that axis is a barrier exactly as for the plain
LayerNormalization (:class:`~spa_compiler.ops.norm.LayerNorm`): the residual stream keeps its
size, and the leading (batch, sequence) axes are identity. With ``--prune-hidden`` the hidden
axis is coupled through every operand, parameter and output (lossy: the statistics are then
taken over the kept elements only), as for LayerNorm.

* ``SkipLayerNormalization``: ``s = input + skip + bias``, ``output = LN(s) * gamma + beta``,
  optional outputs ``mean``, ``inv_std_var`` (``[..., 1]``) and ``input_skip_bias_sum = s``.
* ``SkipSimplifiedLayerNormalization``: the same with ``RMSNorm(s) * gamma`` (no beta).
* ``SimplifiedLayerNormalization``: ``X / sqrt(mean(X²) + eps) * scale`` over ``axis..``.
* ``EmbedLayerNormalization``: ``LN(word[ids] + position[pos] + segment[seg]) * gamma + beta``
  and the mask index ``[B]``; the embedding tables' rows (vocabulary) are never pruned.
* ``BiasGelu`` ``gelu(A + B)`` and ``FastGelu`` ``gelu_tanh(X + bias)``: element-wise with
  broadcasting, the bias sliced with the channels (FFN neurons).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import couple_broadcast, couple_same, input_at, output_at
from .norm import LayerNorm
from .registry import Coupler, OpRule, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["SkipLayerNorm", "SkipSimplifiedLayerNorm", "SimplifiedLayerNorm", "EmbedLayerNorm", "BiasGelu"]

MS = "com.microsoft"


def _couple_hidden(c: Coupler, y: str, tensors: list[str]) -> None:
    """With ``--prune-hidden``: the last axis of every tensor given couples with ``y``'s (lossy)."""
    if not c.prune_hidden:
        return
    last = len(c.shape(y)) - 1
    for name in tensors:
        if name:
            c.couple(name, len(c.shape(name)) - 1, y, last)
    c.tag(y, last, "lossy")


@register_op("SkipLayerNormalization", domain=MS, opsets=(1, 99))
class SkipLayerNorm(OpRule):
    """``LN(input + skip + bias) * gamma + beta`` over the last axis: leading axes identity (skip
    broadcast), the hidden axis a barrier (coupled, lossy, with ``--prune-hidden``)."""

    summary = "leading axes identity (skip broadcast); hidden axis blocked (coupled, lossy, with --prune-hidden)"
    parameters = (2, 3, 4)  # gamma, beta, bias

    def couple(self, node: "Node", c: Coupler) -> None:
        x, skip, y = node.inputs[0], node.inputs[1], node.outputs[0]
        last = len(c.shape(x)) - 1
        for out in node.outputs:
            if out:
                couple_same(c, x, out, range(last))
        skip_rank = len(c.shape(skip))
        for k in range(skip_rank - 1):
            out_axis = last - (skip_rank - 1) + k
            if c.shape(skip)[k] == c.shape(y)[out_axis]:
                c.couple(skip, k, y, out_axis)
        _couple_hidden(c, y, [x, skip, output_at(node, 3), *(input_at(node, k) for k in self.parameters)])

    def added_bias(self, node: "Node", name: str) -> str | None:
        """``bias``, added to ``input`` (the layer before the residual add) first."""
        return input_at(node, self.parameters[-1]) or None if name == node.inputs[0] else None


@register_op("SkipSimplifiedLayerNormalization", domain=MS, opsets=(1, 99))
class SkipSimplifiedLayerNorm(SkipLayerNorm):
    """``RMSNorm(input + skip + bias) * gamma``: as SkipLayerNormalization, with no beta."""

    parameters = (2, 3)  # gamma, bias


@register_op("SimplifiedLayerNormalization", opsets=(1, 99))
class SimplifiedLayerNorm(LayerNorm):
    """RMSNorm ``X / sqrt(mean(X²) + eps) * scale`` over axes ``axis..``: as LayerNormalization
    (its ``inv_std_var`` output is LayerNormalization's ``InvStdDev``)."""


@register_op("EmbedLayerNormalization", domain=MS, opsets=(1, 99))
class EmbedLayerNorm(OpRule):
    """Token, position and segment embeddings summed and layer-normalised: the ids' axes are the
    output's batch and sequence axes, the mask index's axis the batch; the hidden axis is a
    barrier (coupled through the tables' columns, gamma and beta, lossy, with ``--prune-hidden``)."""

    summary = "batch/sequence identity; hidden axis blocked (coupled, lossy, with --prune-hidden)"

    def couple(self, node: "Node", c: Coupler) -> None:
        ids, y = node.inputs[0], node.outputs[0]
        outputs = [y, output_at(node, 2)]
        for out in outputs:
            if out:
                couple_same(c, ids, out, [0, 1])
        if output_at(node, 1) and len(c.shape(output_at(node, 1))) == 1 and c.shape(output_at(node, 1))[0] == c.shape(ids)[0]:
            c.couple(output_at(node, 1), 0, y, 0)
        _couple_hidden(c, y, [outputs[1], *(input_at(node, k) for k in (2, 3, 4, 5, 6))])


@register_op("BiasGelu", "FastGelu", domain=MS, opsets=(1, 99))
class BiasGelu(OpRule):
    """``gelu(A + B)`` (FastGelu: the tanh approximation, B optional): element-wise with numpy
    broadcasting, the bias sliced with the channels it is added to."""

    summary = "element-wise with broadcasting; bias sliced"

    def couple(self, node: "Node", c: Coupler) -> None:
        couple_broadcast(c, node.inputs, node.outputs[0])

    def added_bias(self, node: "Node", name: str) -> str | None:
        """``B``, added to ``A`` before the activation."""
        return input_at(node, 1) or None if name == node.inputs[0] else None
