"""onnxruntime's fused attention ops (domain ``com.microsoft``): Attention, MultiHeadAttention,
GroupQueryAttention and RotaryEmbedding, pruned by whole attention heads (Attention also by
head dimensions).

Every one computes each head on its own: head ``h`` reads elements ``h*D .. (h+1)*D - 1`` of
the query, key and value hidden axes (``D`` the head size, ``hidden / num_heads``) and writes
the same slab of the output, and a softmax runs over key positions within one head only. So
removing a head's slabs from every operand and lowering ``num_heads`` leaves the other heads'
outputs exactly as they were; removing part of a head is never done. The units are anchored
on the output's hidden axis: output element ``i`` couples with ``(i // Dv) * Dv``, the first
element of its head, and every other per-head element (a weight column, a bias element, a
past-state or attention-bias row) couples with that anchor.

* ``Attention`` projects its input through a packed ``weights[input_hidden, 2 * hq + hv]``
  (columns: Q, then K, then V, each ``num_heads`` slabs of ``Dq`` or ``Dv``; ``qkv_hidden_sizes``
  ``[hq, hq, hv]``, or three equal thirds) and ``bias``; the weight's columns are the roots, its
  rows read the input (a linear map, ``input_weight``). With ``--head-dims`` (no past state,
  ``Dq = Dv``) the units are head dimensions instead, as for the plain ops: position d of every
  head's Q, K and V and of the output; the head count stays and the original ``scale`` is
  written (its default follows the head size). Within a head the attention is invariant
  to a basis change of Q and K (``A Bᵀ = I``) and of V (undone in the output projection), so
  :mod:`spa_compiler.head_rotation` rotates the packed weight's slabs as it does plain
  projections.
* ``MultiHeadAttention`` takes projected ``query``, ``key``, ``value`` (``[B, S, hidden]``) and
  an optional packed ``bias[3 * hidden]``; the projections before it are the roots.
* ``GroupQueryAttention``: query head ``h`` attends with key/value head ``h // r`` (``r =
  num_heads / kv_num_heads``). Either *whole KV groups* go (a key/value head and its ``r`` query
  heads; ``kv_num_heads`` lowered too) or *query heads within groups* (position ``t`` of every
  group together, the key/value heads kept). Whole groups first; where they are blocked (a KV
  cache in the model's interface, ``past_key`` a graph input or ``present_key`` a graph output,
  whose shapes keep their sizes unless ``--allow-io-change`` names them) the analysis asks again
  (``Coupler.repeat_merge``) and the query heads within groups are the units.
* ``RotaryEmbedding`` rotates pairs of dimensions within one head, the same way in every head.

MACs: ``S * T * (Dq + Dv)`` per head and sequence (``Q·Kᵀ`` and ``P·V``, ``T`` the key length),
and for Attention also its projection ``S * input_hidden * (2 * hq + hv)``. Forms not modelled
(packed or BNSH query/key/value in MultiHeadAttention, ``qkv_hidden_sizes`` with Q and K unequal, rotary
inside Attention, shared past/present buffers, quantized KV caches, QK outputs) are barriers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .common import input_at, output_at
from .registry import Coupler, OpRule, Rewriter, Unsupported, WeightView, register_op

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "attention_sizes", "head_size"]

MS = "com.microsoft"


def head_size(hidden: int, heads: int, what: str) -> int:
    """``hidden / heads``, or Unsupported when heads do not divide the hidden size."""
    if heads <= 0 or hidden % heads:
        raise Unsupported(f"{what} of {hidden} is not a whole number of {heads} heads")
    return hidden // heads


def attention_sizes(node: "Node", width: int) -> tuple[int, int, int]:
    """``(heads, hq, hv)`` of a fused Attention whose packed weight has ``width`` columns: the
    head count and the Q (= K) and V hidden sizes (``qkv_hidden_sizes``, else three equal
    thirds); Unsupported for other layouts."""
    heads = int(node.attr("num_heads", 0))
    sizes = node.attr("qkv_hidden_sizes")
    if sizes:
        if len(sizes) != 3 or sizes[0] != sizes[1] or sum(sizes) != width:
            raise Unsupported(f"qkv_hidden_sizes {list(sizes)} are not Q and K of one size and V filling {width} columns")
        return heads, int(sizes[0]), int(sizes[2])
    if width % 3:
        raise Unsupported(f"its weights' {width} columns are not Q, K and V of one size")
    return heads, width // 3, width // 3


def anchor_heads(c: Coupler, y: str, axis: int, size: int) -> None:
    """Make each head of ``y``'s ``axis`` one unit: element ``i`` couples with ``(i // size) * size``."""
    n = c.shape(y)[axis]
    c.couple(y, axis, y, axis, np.arange(n), (np.arange(n) // size) * size)
    c.tag(y, axis, "heads")


def couple_to_heads(c: Coupler, name: str, axis: int, y: str, y_axis: int, size: int,
                    heads: np.ndarray, at: np.ndarray | None = None) -> None:
    """Couple elements ``at`` (all by default) of ``name``'s ``axis`` with the anchors of the
    given ``heads`` (one per element) on ``y``'s ``y_axis``, whose heads are ``size`` wide."""
    at = np.arange(c.shape(name)[axis]) if at is None else at
    c.couple(name, axis, y, y_axis, at, np.asarray(heads) * size)


def _refuse(node: "Node", slots: dict[int, str], attrs: dict[str, str]) -> None:
    """Unsupported when an input slot or a non-zero attribute that the rule does not model is given."""
    for slot, what in slots.items():
        if input_at(node, slot):
            raise Unsupported(f"its {what} input is not modelled")
    for attr, what in attrs.items():
        if node.attr(attr, 0):
            raise Unsupported(f"{what} is not modelled")


def _per_head_rows(c: Coupler, name: str, axis: int, heads: int, y: str, size: int,
                   head_of: Callable[[np.ndarray], np.ndarray] = lambda h: h) -> None:
    """Couple an axis with one element per head (past state, attention bias, sinks) with those
    heads; an axis of size 1 broadcasts over heads and couples nothing."""
    if not name:
        return
    n = c.shape(name)[axis]
    if n == heads:
        couple_to_heads(c, name, axis, y, 2, size, head_of(np.arange(n)))
    elif n != 1:
        raise Unsupported(f"axis {axis} of '{name}' ({n}) is neither 1 nor the {heads} heads")


def _key_length(present: str, present_axis: int, key: str, key_axis: int) -> tuple[str, int]:
    """The axis whose size is the key length ``T``: the present state's when the op returns
    it (past and new positions), else the key's own."""
    return (present, present_axis) if present else (key, key_axis)


@register_op("Attention", domain=MS, opsets=(1, 99))
class Attention(OpRule):
    """``Q|K|V = input @ weights + bias``, ``output = concat_h softmax(Q_h K_hᵀ * scale + mask) V_h``."""

    summary = "whole heads: packed QKV weight columns and bias (roots), num_heads rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        _refuse(node, {}, {"do_rotary": "rotary embedding inside Attention",
                           "past_present_share_buffer": "a past/present buffer shared in place"})
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        bias, past, attention_bias = input_at(node, 2), input_at(node, 4), input_at(node, 5)
        if not c.is_constant(w) or len(c.shape(w)) != 2 or len(c.shape(x)) != 3:
            raise Unsupported("its weights are not a constant [input_hidden, 3 * hidden] matrix over a [B, S, input_hidden] input")
        heads, hq, hv = attention_sizes(node, c.shape(w)[1])
        dq, dv = head_size(hq, heads, "the Q hidden size"), head_size(hv, heads, "the V hidden size")
        if c.shape(y)[2] != hv:
            raise Unsupported(f"its output's hidden size {c.shape(y)[2]} is not the V hidden size {hv}")
        if c.head_dims and dq == dv and not (past or output_at(node, 1)):
            self._couple_head_dims(c, w, bias, y, hq, dq, dv)
        else:
            self._couple_heads(c, w, bias, y, hq, dq, dv)
            for name in (past, output_at(node, 1)):  # [2, B, heads, positions, D]
                _per_head_rows(c, name, 2, heads, y, dv)
            _per_head_rows(c, attention_bias, 1, heads, y, dv)
        c.couple(x, 2, w, 0)
        c.root(w, 1)
        c.tag(w, 0, "weight")
        c.tag(w, 1, "weight")
        c.tag(w, 0, "consumer")

    @staticmethod
    def _couple_heads(c: Coupler, w: str, bias: str, y: str, hq: int, dq: int, dv: int) -> None:
        """Whole heads: the Q, K and V slabs of head h (and their bias) with output head h."""
        anchor_heads(c, y, 2, dv)
        columns = np.arange(c.shape(w)[1])
        head = np.where(columns < 2 * hq, (columns % hq) // dq, (columns - 2 * hq) // dv)
        for name in (w, bias):
            if name:
                couple_to_heads(c, name, len(c.shape(name)) - 1, y, 2, dv, head)

    @staticmethod
    def _couple_head_dims(c: Coupler, w: str, bias: str, y: str, hq: int, dq: int, dv: int) -> None:
        """Head dimensions (``--head-dims``): position d of every head's query, key and value,
        and output element ``h*D + d``, is one unit (``Q_h K_hᵀ`` sums over d, so every head
        loses the same d of both), anchored on head 0's query column d. The head count stays;
        a per-head attention bias keeps its rows."""
        columns = np.arange(c.shape(w)[1])
        c.couple(w, 1, w, 1, columns, np.where(columns < 2 * hq, columns % dq, (columns - 2 * hq) % dv))
        hidden = c.shape(y)[2]
        c.couple(y, 2, w, 1, np.arange(hidden), np.arange(hidden) % dv)
        c.tag(y, 2, "head_dims")
        if bias:
            c.couple(bias, 0, w, 1)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        """``num_heads`` the heads with a column left; ``qkv_hidden_sizes`` when head dimensions
        went (Q and K lose the same ones, V its own), and then the original ``scale``
        (``1/√Dq`` unless given) explicitly, since its default follows the head size."""
        w = node.inputs[1]
        heads, hq, hv = attention_sizes(node, r.old_shape(w)[1])
        dq = hq // heads
        kept = np.setdiff1d(np.arange(2 * hq + hv), r.removed(w, 1))
        head = np.where(kept < 2 * hq, (kept % hq) // dq, (kept - 2 * hq) // (hv // heads))
        remaining = len(np.unique(head))
        new_q, new_v = int(np.sum(kept < hq)), int(np.sum(kept >= 2 * hq))
        r.set_attr(node, "num_heads", remaining)
        if node.attr("qkv_hidden_sizes") or new_q != new_v:
            r.set_attr(node, "qkv_hidden_sizes", [new_q, new_q, new_v])
        if new_q // remaining != dq and node.attr("scale") is None:
            r.set_attr(node, "scale", float(1.0 / np.sqrt(dq)))

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        x, w = node.inputs[0], node.inputs[1]
        return [(x, 0), (x, 1), (x, 2), (w, 1), _key_length(output_at(node, 1), 3, x, 1), (node.outputs[0], 2)]

    def macs_value(self, sizes: Sequence[float]) -> float:
        """``B * S * (input_hidden * (2hq + hv) + T * (hq + hv))``: the projection, then ``Q·Kᵀ``
        and ``P·V`` (``hv`` the output's hidden size, ``hq`` the rest of the weight's half)."""
        b, s, hidden_in, width, t, hv = sizes
        return b * s * (hidden_in * width + t * ((width - hv) / 2 + hv))

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """The packed QKV projection ``input @ weights + bias``."""
        if node.inputs[1] != weight or axis != 0:
            return None
        return WeightView(shape[1], -1, (), input_at(node, 2) or None)


@register_op("MultiHeadAttention", domain=MS, opsets=(1, 99))
class MultiHeadAttention(OpRule):
    """``output = concat_h softmax((Q_h + bq_h)(K_h + bk_h)ᵀ * scale + masks) (V_h + bv_h)`` over
    projected ``[B, S, hidden]`` query, key and value."""

    summary = "whole heads over projected query/key/value and packed bias; num_heads rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        _refuse(node, {9: "cache_indirection"}, {})
        if output_at(node, 3):
            raise Unsupported("its QK output is not modelled")
        q, k, v, y = node.inputs[0], input_at(node, 1), input_at(node, 2), node.outputs[0]
        if not (k and v) or any(len(c.shape(t)) != 3 for t in (q, k, v)):
            raise Unsupported("only separate [B, S, hidden] query, key and value are modelled (not packed or BNSH)")
        heads = int(node.attr("num_heads", 0))
        hq, hv = c.shape(q)[2], c.shape(v)[2]
        dq, dv = head_size(hq, heads, "the query hidden size"), head_size(hv, heads, "the value hidden size")
        if c.shape(k)[2] != hq or c.shape(y)[2] != hv:
            raise Unsupported("its key and query (or value and output) hidden sizes differ")
        anchor_heads(c, y, 2, dv)
        for name, size in ((q, dq), (k, dq), (v, dv)):
            couple_to_heads(c, name, 2, y, 2, dv, np.arange(c.shape(name)[2]) // size)
        bias = input_at(node, 3)
        if bias:
            columns = np.arange(2 * hq + hv)
            couple_to_heads(c, bias, 0, y, 2, dv, np.where(columns < 2 * hq, (columns % hq) // dq, (columns - 2 * hq) // dv))
        for name in (input_at(node, 6), input_at(node, 7), output_at(node, 1), output_at(node, 2)):  # [B, heads, T, D]
            _per_head_rows(c, name, 1, heads, y, dv)
        _per_head_rows(c, input_at(node, 5), 1, heads, y, dv)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        y = node.outputs[0]
        dv = r.old_shape(y)[2] // int(node.attr("num_heads"))
        r.set_attr(node, "num_heads", r.new_shape(y)[2] // dv)

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        return [(q, 0), (q, 1), (q, 2), (v, 2), _key_length(output_at(node, 1), 2, k, 1)]

    def macs_value(self, sizes: Sequence[float]) -> float:
        """``B * S * T * (hq + hv)``: ``Q·Kᵀ`` and ``P·V``."""
        b, s, hq, hv, t = sizes
        return b * s * t * (hq + hv)


@register_op("GroupQueryAttention", domain=MS, opsets=(1, 99))
class GroupQueryAttention(OpRule):
    """Query head ``h`` attends with key/value head ``h // r``: whole KV groups or query heads
    within groups (see the module docstring); num_heads (and kv_num_heads) rewritten."""

    summary = "whole KV groups (kv_num_heads) or query heads within groups; num_heads rewritten"

    def _layout(self, node: "Node", out_hidden: int) -> tuple[int, int, int]:
        """``(heads, kv_heads, D)``."""
        heads, kv_heads = int(node.attr("num_heads", 0)), int(node.attr("kv_num_heads", 0))
        d = head_size(out_hidden, heads, "the output hidden size")
        if kv_heads <= 0 or heads % kv_heads:
            raise Unsupported(f"{heads} query heads do not form {kv_heads} equal KV groups")
        return heads, kv_heads, d

    def couple(self, node: "Node", c: Coupler) -> None:
        _refuse(node, {12: "k_scale", 13: "v_scale", 16: "query_seqlens"},
                {"qk_output": "its QK output", "kv_cache_bit_width": "a quantized KV cache"})
        q, k, v, y = node.inputs[0], input_at(node, 1), input_at(node, 2), node.outputs[0]
        if any(len(c.shape(t)) != 3 for t in (q, k, v) if t) or bool(k) != bool(v):
            raise Unsupported("only [B, S, hidden] query, key and value (or packed QKV) are modelled")
        heads, kv_heads, d = self._layout(node, c.shape(y)[2])
        per_group = heads // kv_heads
        whole = per_group == 1 or not c.repeat_merge(y, k or q, 2)
        anchor_of = (lambda h: (h // per_group) * per_group) if whole else (lambda h: h % per_group)
        anchor_heads(c, y, 2, d)
        c.couple(y, 2, y, 2, np.arange(heads * d), anchor_of(np.arange(heads * d) // d) * d)
        query_columns = np.arange(heads * d)
        couple_to_heads(c, q, 2, y, 2, d, anchor_of(query_columns // d), query_columns)
        if whole:
            kv_columns = np.arange(kv_heads * d)
            kv_anchor = (kv_columns // d) * per_group
            if k:
                for name in (k, v):
                    couple_to_heads(c, name, 2, y, 2, d, kv_anchor)
            else:  # packed [Q | K | V] on the query's hidden axis
                for offset in (heads * d, (heads + kv_heads) * d):
                    couple_to_heads(c, q, 2, y, 2, d, kv_anchor, offset + kv_columns)
            for name in (input_at(node, 3), input_at(node, 4), output_at(node, 1), output_at(node, 2)):
                _per_head_rows(c, name, 1, kv_heads, y, d, lambda g: g * per_group)
        _per_head_rows(c, input_at(node, 10), 1, heads, y, d, anchor_of)
        _per_head_rows(c, input_at(node, 11), 0, heads, y, d, anchor_of)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        q, k, y = node.inputs[0], input_at(node, 1), node.outputs[0]
        _, _, d = self._layout(node, r.old_shape(y)[2])
        heads = r.new_shape(y)[2] // d
        kv_width = r.new_shape(k)[2] if k else (r.new_shape(q)[2] - heads * d) // 2
        r.set_attr(node, "num_heads", heads)
        r.set_attr(node, "kv_num_heads", kv_width // d)

    def macs_axes(self, node: "Node", shape: Callable[[str], tuple[int, ...]]):
        y, present = node.outputs[0], output_at(node, 1)
        return [(y, 0), (y, 1), (y, 2), (present, 2) if present else (input_at(node, 1) or node.inputs[0], 1)]

    def macs_value(self, sizes: Sequence[float]) -> float:
        """``2 * B * S * T * heads * D``: ``Q·Kᵀ`` and ``P·V``."""
        b, s, hidden, t = sizes
        return 2 * b * s * t * hidden


@register_op("RotaryEmbedding", domain=MS, opsets=(1, 99))
class RotaryEmbedding(OpRule):
    """Rotates pairs of dimensions within each head, alike in every head: on a ``[B, S, hidden]``
    input whole heads are units (``num_heads`` rewritten when set)."""

    summary = "[B, S, hidden] by whole heads, identity; num_heads rewritten"

    @staticmethod
    def _head_size(node: "Node", hidden: int, cos_width: int) -> int:
        """``hidden / num_heads`` when ``num_heads`` is set, else twice the cache's width."""
        heads = int(node.attr("num_heads", 0))
        if heads:
            return head_size(hidden, heads, "the hidden size")
        if hidden % (2 * cos_width):
            raise Unsupported(f"the hidden size {hidden} is not a whole number of {2 * cos_width}-wide heads")
        return 2 * cos_width

    def couple(self, node: "Node", c: Coupler) -> None:
        _refuse(node, {}, {"is_packed_batching": "packed batching"})
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        if rank != 3:
            raise Unsupported(f"only a [B, S, hidden] input is modelled, not rank {rank}")
        d = self._head_size(node, c.shape(x)[2], c.shape(node.inputs[2])[-1])
        c.couple(x, 0, y, 0)
        c.couple(x, 1, y, 1)
        c.couple(x, 2, y, 2)
        anchor_heads(c, y, 2, d)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        x = node.inputs[0]
        if node.attr("num_heads", 0):
            d = self._head_size(node, r.old_shape(x)[2], r.old_shape(node.inputs[2])[-1])
            r.set_attr(node, "num_heads", r.new_shape(x)[2] // d)
