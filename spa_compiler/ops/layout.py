"""Ops that move, join, cut or repeat axes: Concat, Split, Slice, Gather, GatherElements,
ScatterElements, ScatterND, Transpose, Squeeze, Unsqueeze, Shape, Expand, ConstantOfShape, Tile
(Reshape and Flatten, which regroup axes: :mod:`.reshape`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..shape_values import Dim
from .common import couple_broadcast, couple_same, int_param, normalized_axes, write_int_param
from .patterns import feeds_attention
from .registry import Coupler, OpRule, Rewriter, Unsupported, normalize_axis, register_op
from .runtime_shapes import (
    bounds_at_run_time, clamp, couple_run_time_slice, couple_run_time_target, rewrite_run_time_target,
)

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "Concat", "Split", "Slice", "Gather", "GatherElements", "ScatterElements", "ScatterND", "Transpose", "Squeeze",
    "Unsqueeze", "Shape", "Expand", "ConstantOfShape", "Tile",
]


@register_op("Concat")
class Concat(OpRule):
    """Input k's element i on the concat axis is output element ``offset_k + i``."""

    summary = "offset map on the concat axis; other axes identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        y = node.outputs[0]
        axis = normalize_axis(int(node.attr("axis")), len(c.shape(y)))
        offset = 0
        for x in node.inputs:
            n = c.shape(x)[axis]
            c.couple(x, axis, y, axis, np.arange(n), offset + np.arange(n))
            couple_same(c, x, y, [k for k in range(len(c.shape(y))) if k != axis])
            offset += n


@register_op("Split")
class Split(OpRule):
    """Output k's element i on the split axis is input element ``offset_k + i``; the split sizes
    (attribute, input or ``num_outputs``) are rewritten. A packed projection's queries, keys and
    values taken apart into equal parts (GPT-2's ``c_attn``) lose the same elements of every part
    when head dimensions are the units: position d of every head's query, key and value is one
    unit, as in the packed weight of onnxruntime's fused ``Attention``."""

    summary = "offset map on the split axis; split sizes rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        x = node.inputs[0]
        axis = normalize_axis(int(node.attr("axis", 0)), len(c.shape(x)))
        offset = 0
        for y in node.outputs:
            n = c.shape(y)[axis]
            c.couple(y, axis, x, axis, np.arange(n), offset + np.arange(n))
            couple_same(c, x, y, [k for k in range(len(c.shape(x))) if k != axis])
            offset += n
        if c.head_dims and _attention_parts(c, node.outputs, axis):
            for y in node.outputs[1:]:
                c.couple(y, axis, node.outputs[0], axis)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        axis = normalize_axis(int(node.attr("axis", 0)), len(r.old_shape(node.inputs[0])))
        old = [r.old_shape(y)[axis] for y in node.outputs]
        new = [r.new_shape(y)[axis] for y in node.outputs]
        if new == old:
            return
        if "split" in node.attrs or r.opset < 13:
            r.set_attr(node, "split", new)
        else:
            r.remove_attr(node, "num_outputs")
            r.set_input(node, 1, np.asarray(new, dtype=np.int64))


def _attention_parts(c: Coupler, parts: list[str], axis: int) -> bool:
    """Whether the outputs of a split are equal parts that each reach a product of two
    activations (Q·Kᵀ, P·V), directly or through the Reshape that splits their heads."""
    if len(parts) < 2 or len({c.shape(y)[axis] for y in parts}) != 1:
        return False
    return all(feeds_attention(c, y) or any(r.op_type == "Reshape" and feeds_attention(c, r.outputs[0])
                                            for r in c.consumers(y)) for y in parts)


def _slice_params(node: "Node", c: Coupler | Rewriter, rank: int):
    if c.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes, steps = node.attr("axes"), None
    else:
        starts, ends = int_param(node, c, "starts", 1), int_param(node, c, "ends", 2)
        axes, steps = int_param(node, c, "axes", 3), int_param(node, c, "steps", 4)
    axes = list(axes) if axes else list(range(len(starts)))
    steps = list(steps) if steps else [1] * len(starts)
    return list(starts), list(ends), [normalize_axis(a, rank) for a in axes], steps


@register_op("Slice")
class Slice(OpRule):
    """On a sliced axis with step 1, input element ``start + i`` is output element i; input
    elements outside the slice may be removed freely (the bounds are rewritten). A strided
    slice axis is a barrier. Bounds computed at run time from the sliced axis's own size
    (``torch.chunk``) are followed symbolically: see :func:`~spa_compiler.ops.runtime_shapes.chunk_length`."""

    summary = "sliced axes offset-mapped (step 1); bounds rewritten, or run-time chunk bounds followed"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = c.shape(x)
        if bounds_at_run_time(node, c):
            couple_run_time_slice(node, c)
            return
        starts, ends, axes, steps = _slice_params(node, c, len(shape))
        sliced = dict(zip(axes, zip(starts, ends, steps)))
        for axis, dim in enumerate(shape):
            if axis not in sliced:
                c.couple(x, axis, y, axis)
                continue
            start, end, step = sliced[axis]
            if step != 1:
                continue
            start, end = clamp(start, dim), clamp(end, dim)
            inside = np.arange(start, max(start, end))
            c.couple(x, axis, y, axis, inside, inside - start)
            outside = np.setdiff1d(np.arange(dim), inside)
            c.free(x, axis, outside)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        if bounds_at_run_time(node, r):
            return  # checked at analysis to follow the pruned sizes by themselves
        x = node.inputs[0]
        shape = r.old_shape(x)
        starts, ends, axes, steps = _slice_params(node, r, len(shape))
        changed = False
        for k, axis in enumerate(axes):
            removed = r.removed(x, axis)
            if not removed.size:
                continue
            dim = shape[axis]
            start = clamp(starts[k], dim)
            new_start = start - int(np.count_nonzero(removed < start))
            starts[k] = new_start
            if ends[k] < dim:
                ends[k] = new_start + r.new_shape(node.outputs[0])[axis]
            changed = True
        if changed and r.opset < 10:
            r.set_attr(node, "starts", starts)
            r.set_attr(node, "ends", ends)
        elif changed:
            write_int_param(node, r, "starts", 1, starts)
            write_int_param(node, r, "ends", 2, ends)


@register_op("Gather")
class Gather(OpRule):
    """``y = take(data, indices, axis)``. Non-gathered axes are identity. With constant 1-D
    indices, output position p is data element ``indices[p]`` and data elements never gathered
    may be removed; the indices are rewritten. Run-time indices over an axis make it a barrier,
    except that the indices' own axes map to the output positions."""

    summary = "constant 1-D indices: positions mapped, indices rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rank = len(c.shape(data))
        axis = normalize_axis(int(node.attr("axis", 0)), rank)
        index_rank = len(c.shape(indices))
        for k in range(rank):
            if k < axis:
                c.couple(data, k, y, k)
            elif k > axis:
                c.couple(data, k, y, k + index_rank - 1)
        if not c.is_constant(indices):
            for k in range(index_rank):
                c.couple(indices, k, y, axis + k)
            return
        if index_rank != 1:
            return
        dim = c.shape(data)[axis]
        picked = np.asarray(c.constant(indices)).astype(np.int64)
        picked = np.where(picked < 0, picked + dim, picked)
        c.couple(data, axis, y, axis, picked, np.arange(picked.size))
        c.free(data, axis, np.setdiff1d(np.arange(dim), picked))

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        axis = normalize_axis(int(node.attr("axis", 0)), len(r.old_shape(data)))
        if not r.is_constant(indices) or r.constant(indices).ndim != 1:
            return
        removed_data, removed_pos = r.removed(data, axis), r.removed(y, axis)
        if not removed_data.size and not removed_pos.size:
            return
        dim = r.old_shape(data)[axis]
        picked = np.asarray(r.constant(indices)).astype(np.int64)
        picked = np.where(picked < 0, picked + dim, picked)
        kept = np.delete(picked, removed_pos)
        new_index = np.cumsum(~np.isin(np.arange(dim), removed_data)) - 1
        r.set_input(node, 1, new_index[kept].astype(r.constant(indices).dtype))


@register_op("GatherElements")
class GatherElements(OpRule):
    """``y[i0..ik..] = data[i0..indices[i0..ik..]..]`` along ``axis``: output position p of every
    axis is data position p and indices position p, except along ``axis``, where the data
    positions are whatever the indices hold (a barrier) and the output follows the indices.
    Axes on which the three sizes differ read positions by offset (a barrier). Constant indices
    are sliced with their axes; their values stay (the gathered axis keeps its size)."""

    summary = "non-gathered axes identity with the indices; the gathered data axis a barrier"

    def couple(self, node: "Node", c: Coupler) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        axis = normalize_axis(int(node.attr("axis", 0)), len(c.shape(data)))
        for k, (size_data, size_indices) in enumerate(zip(c.shape(data), c.shape(indices))):
            if k == axis:
                c.couple(indices, k, y, k)
            elif size_data == size_indices:
                c.couple(data, k, y, k)
                c.couple(indices, k, y, k)


@register_op("ScatterElements", "Scatter")
class ScatterElements(OpRule):
    """``y = data`` with ``y[i0..indices[i0..ik..]..] = updates[i0..ik..]`` along ``axis``: on
    every other axis where the data and the indices have the same size, position p of the data,
    the indices, the updates and the output is one, and a removed position leaves all four.
    Along ``axis`` (and on axes the indices cover only in part) which output position an update
    lands on is whatever the indices hold: a barrier. Constant indices are sliced with their
    axes; their values stay."""

    summary = "non-scattered axes identity with the indices and updates; the scattered axis a barrier"

    def couple(self, node: "Node", c: Coupler) -> None:
        data, indices, updates, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        axis = normalize_axis(int(node.attr("axis", 0)), len(c.shape(data)))
        for k, (size_data, size_indices) in enumerate(zip(c.shape(data), c.shape(indices))):
            if k != axis and size_data == size_indices:
                for name in (data, indices, updates):
                    c.couple(name, k, y, k)


@register_op("ScatterND", opsets=(11, 23))
class ScatterND(OpRule):
    """``y = data`` with ``y[indices[i, :]] = updates[i]`` (``i`` the indices' leading axes):
    each index row addresses the data's first ``m`` axes (``m`` the indices' last size), and
    each update is a slice over the data's remaining axes. Data axis ``j >= m`` is output axis
    ``j`` and updates axis ``q - 1 + j - m`` (``q`` the indices' rank), position for position,
    whatever the indices hold or the reduction is: channels there leave all three together
    (RWKV's recurrence writing one time step of every channel at a time). The addressed axes
    and which update goes where are barriers."""

    summary = "axes past the addressed ones identity with the updates; addressed axes a barrier"

    def couple(self, node: "Node", c: Coupler) -> None:
        data, indices, updates, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        addressed = c.shape(indices)[-1]
        if not isinstance(addressed, (int, np.integer)):
            raise Unsupported(f"the last size of its indices '{indices}' is not known")
        lead = len(c.shape(indices)) - 1
        for j in range(int(addressed), len(c.shape(data))):
            c.couple(data, j, y, j)
            c.couple(updates, lead + j - int(addressed), y, j)


@register_op("Transpose")
class Transpose(OpRule):
    """Output axis k is input axis ``perm[k]``."""

    summary = "axes permuted"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        rank = len(c.shape(x))
        perm = node.attr("perm") or list(reversed(range(rank)))
        for k, source in enumerate(perm):
            c.couple(x, source, y, k)


def _couple_in_order(c: Coupler, x: str, y: str, x_axes: list[int], y_axes: list[int]) -> None:
    for a, b in zip(x_axes, y_axes):
        c.couple(x, a, y, b)


@register_op("Squeeze")
class Squeeze(OpRule):
    """Removes size-1 axes; the others map in order. Without an ``axes`` parameter the
    squeezed axes are written out, so that an axis pruned to one element is not squeezed too."""

    summary = "remaining axes identity; implicit axes made explicit"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = c.shape(x)
        gone = self._squeezed(node, c, shape)
        _couple_in_order(c, x, y, [k for k in range(len(shape)) if k not in gone], list(range(len(c.shape(y)))))

    @staticmethod
    def _squeezed(node: "Node", c: Coupler | Rewriter, shape: tuple[int, ...]) -> set[int]:
        axes = int_param(node, c, "axes", 1)
        return set(normalized_axes(axes, len(shape))) if axes else {k for k, d in enumerate(shape) if d == 1}

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        if int_param(node, r, "axes", 1) is None:
            axes = sorted(self._squeezed(node, r, r.old_shape(node.inputs[0])))
            if r.opset < 13:
                r.set_attr(node, "axes", axes)
            else:
                r.set_input(node, 1, np.asarray(axes, dtype=np.int64))


@register_op("Unsqueeze")
class Unsqueeze(OpRule):
    """Inserts size-1 axes; the input axes map in order to the others."""

    summary = "existing axes identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, y = node.inputs[0], node.outputs[0]
        out_rank = len(c.shape(y))
        added = set(normalized_axes(int_param(node, c, "axes", 1) or [], out_rank))
        _couple_in_order(c, x, y, list(range(len(c.shape(x)))), [k for k in range(out_rank) if k not in added])


@register_op("Shape")
class Shape(OpRule):
    """Reads sizes, not values: the input may lose channels on every axis whose size reaches
    only ops followed symbolically (run-time Reshape targets, which then keep the sizes
    consistent); an axis whose size feeds anything else (``sqrt(q.size(-1))``) keeps it."""

    summary = "input axes free unless their size feeds ops not followed"

    def couple(self, node: "Node", c: Coupler) -> None:
        read = c.shape_value_escaping_dims(node.outputs[0])
        if read is None:
            raise Unsupported("its value is used in a way spa-prune cannot follow")
        x = node.inputs[0]
        for axis in range(len(c.shape(x))):
            if Dim(x, axis) in read:
                c.block(x, axis, "its size is used in a way spa-prune cannot follow")
            else:
                c.free(x, axis)


@register_op("Expand")
class Expand(OpRule):
    """Broadcasts to a target shape: input axes of the output's size are identity; an axis
    broadcast from size 1 may lose repeats; target entries other than 1 on a pruned axis are
    rewritten. A target computed at run time (a dynamic key/value cache's repeat of the
    key/value heads) is followed symbolically, as a Reshape's is: an entry that is the size of
    an axis couples that axis with the output axis it sizes, a constant entry is rewritten at
    its source; anything else keeps the axes it reads."""

    summary = "broadcast: equal-size axes identity; constant or run-time target rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, target, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if not c.is_constant(target):
            couple_run_time_target(c, "Expand", x, target, y, keep=1)
        couple_broadcast(c, [x], y)
        source, shape = c.shape(x), c.shape(y)
        for k, size in enumerate(shape):  # a repeated axis loses repeats: its target entry is rewritten
            j = k - (len(shape) - len(source))
            if size > 1 and (j < 0 or source[j] == 1):
                c.free(y, k)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        y, target = node.outputs[0], node.inputs[1]
        old, new = r.old_shape(y), r.new_shape(y)
        if not r.is_constant(target):
            rewrite_run_time_target(r, target, y, keep=1)
            return
        target_values = [int(v) for v in r.constant(target).reshape(-1)]
        offset = len(old) - len(target_values)
        rewritten = [
            new[offset + k] if value != 1 and old[offset + k] != new[offset + k] else value
            for k, value in enumerate(target_values)
        ]
        if rewritten != target_values:
            r.set_input(node, 1, np.asarray(rewritten, dtype=np.int64))


@register_op("ConstantOfShape", opsets=(9, 23))
class ConstantOfShape(OpRule):
    """One value (the ``value`` attribute, 0 by default) at every position of a shape computed
    at run time: a recurrent layer's zero initial state, ``zeros(directions, batch, hidden)``,
    as PyTorch exports it with a free batch axis (a constant shape is folded on loading). Every
    element is the same value, so any positions of any axis may leave and the rest is exactly
    the smaller tensor; the shape is followed as an Expand's target is: an entry that is the
    size of an axis couples that axis, a constant entry is rewritten at its source."""

    summary = "one value everywhere: any axis free; constant shape entries rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        shape, y = node.inputs[0], node.outputs[0]
        for k in range(len(c.shape(y))):
            c.free(y, k)
        couple_run_time_target(c, "ConstantOfShape", y, shape, y, keep=None)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        rewrite_run_time_target(r, node.inputs[0], node.outputs[0], keep=None)


@register_op("Tile")
class Tile(OpRule):
    """Axes repeated once are identity; repeated axes are barriers."""

    summary = "axes with repeat 1 identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        repeats = int_param(node, c, "repeats", 1)
        x, y = node.inputs[0], node.outputs[0]
        couple_same(c, x, y, [k for k, rep in enumerate(repeats) if rep == 1])
