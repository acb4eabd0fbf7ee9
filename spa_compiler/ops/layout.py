"""Ops that move, join, cut or regroup axes: Concat, Split, Slice, Gather, Transpose, Squeeze,
Unsqueeze, Flatten, Reshape, Expand, Tile.

Reshape and Flatten are described by blocks: both shapes are cut into the shortest runs of axes
whose sizes multiply to the same number. A run of one axis on each side is identity. A *merge*
(input axes ``a0, a1, ...`` into one output axis, as Flatten does with ``C, H, W``) couples output
element ``f`` with element ``f // (|a1| * |a2| * ...)`` of the outermost input axis ``a0``: removing
channel c removes the slab of features ``c*HW .. (c+1)*HW - 1``; the inner axes are barriers. A
*split* (one input axis into ``b0, b1, ...``) couples input element i with its digit on one
output axis ``bk``, ``(i // (|b(k+1)| * ...)) % |bk|``: the outermost axis that nothing downstream
slices, gathers or splits along. Hidden index ``h*D + d`` belongs to head h, so heads (or
groups) leave whole and the merge back ``[H, D] -> H*D`` maps them again; a fused projection
split as ``[3, H, D]`` and then sliced into q, k, v couples on H. The other axes of the split
are never pruned. A split that a
Transpose and a Reshape follow is a channel shuffle: there input element i couples with element
``i % |b_last|`` of the innermost axis, removing the same position from every group, which the
merge of the transposed axes maps exactly. A block that merges and splits at once (GroupNorm's
``[N, C, H, W] -> [N, G, C/G * H * W]``) couples its outer axes slab by slab when one inner size
divides the other, so that whole groups of channels leave together. Any other regrouping is a
barrier.

With ``--head-dims`` the splits and merges of attention couple the innermost axis instead: the
units are head dimensions, position d of every head (Q·Kᵀ couples Q's and K's, P·V V's with the
output projection).
A merge of repeated key/value heads (grouped-query attention: an Expand broadcasting ``[KV, 1]`` to
``[KV, R]``, merged into ``KV * R`` query heads) couples the outer axis (whole key/value groups
leave with their query heads), unless the analysis finds those groups blocked (a key/value cache
in the graph's interface): then it couples the inner axis, query head ``g*R + r`` with repeat
``r``, so the same query head of every group leaves and the key/value heads stay.
A merge of a recurrent layer's ``[directions, hidden]`` couples the innermost (hidden) axis likewise:
feature ``d*H + j`` is hidden unit ``j`` of direction ``d``.

Targets computed at run time (``Shape -> Gather -> Unsqueeze -> Concat``) are followed
symbolically (``spa_compiler.shape_values``): an entry that is the run-time size of an axis couples
that axis with the output axis it sizes; a constant entry (a head count) is rewritten at its
source.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .common import couple_broadcast, couple_same, int_param, normalized_axes, write_int_param
from ..shape_values import Const, Dim, Expr
from .registry import Coupler, OpRule, Rewriter, Unsupported, normalize_axis, register_op
from .runtime_shapes import bounds_at_run_time, clamp, couple_computed_entry, couple_run_time_slice, couple_sized_by

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "Concat", "Split", "Slice", "Gather", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Reshape", "Shape", "Expand", "Tile", "reshape_blocks", "couple_reshape",
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
    (attribute, input or ``num_outputs``) are rewritten."""

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


def reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Cut two shapes of equal size into the shortest runs of axes with equal products.

    >>> reshape_blocks((1, 64, 7, 7), (1, 3136))
    [([0], [0]), ([1, 2, 3], [1])]
    """
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ia, jb = [], []
        pa = pb = 1
        if i < len(a):
            ia.append(i); pa = a[i]; i += 1
        if j < len(b):
            jb.append(j); pb = b[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i); pa *= a[i]; i += 1
            elif pb < pa and j < len(b):
                jb.append(j); pb *= b[j]; j += 1
            else:
                raise Unsupported(f"shapes {a} and {b} do not have the same size")
        blocks.append((ia, jb))
    return blocks


def couple_reshape(c: Coupler, x: str, y: str) -> dict[int, int]:
    """Couple a reshape's input and output by blocks (see the module docstring). Returns, for
    each output axis that loses elements with an input axis, that input axis."""
    a, b = c.shape(x), c.shape(y)
    coupled: dict[int, int] = {}
    for ia, jb in reshape_blocks(a, b):
        big_a = [k for k in ia if a[k] > 1]
        big_b = [k for k in jb if b[k] > 1]
        if len(big_a) == 1 and len(big_b) == 1:
            c.couple(x, big_a[0], y, big_b[0])
            coupled[big_b[0]] = big_a[0]
        elif len(big_b) == 1 and len(big_a) > 1:
            n = b[big_b[0]]
            if len(big_a) == 2 and _repeats_inner_axis(c, x, big_a[1]) and c.repeat_merge(y, x, big_a[0]):
                c.block(x, big_a[0], "query heads are pruned within each key/value group, whose key/value heads stay")
                c.couple(y, big_b[0], x, big_a[1], np.arange(n), np.arange(n) % a[big_a[1]])
                coupled[big_b[0]] = big_a[1]
            elif (c.head_dims and _comes_from_attention(c, x)) or _comes_from_recurrent(c, x):
                innermost = big_a[-1]
                c.couple(y, big_b[0], x, innermost, np.arange(n), np.arange(n) % a[innermost])
                coupled[big_b[0]] = innermost
            else:
                outer = big_a[0]
                inner = math.prod(a[k] for k in big_a[1:])
                c.couple(y, big_b[0], x, outer, np.arange(n), np.arange(n) // inner)
                coupled[big_b[0]] = outer
        elif len(big_a) > 1 and len(big_b) > 1:
            if _couple_outer_slabs(c, x, y, [a[k] for k in big_a], [b[k] for k in big_b], big_a[0], big_b[0]):
                coupled[big_b[0]] = big_a[0]
        elif len(big_a) == 1 and len(big_b) > 1:
            n = a[big_a[0]]
            if _followed_by_shuffle(c, y):
                innermost = big_b[-1]
                c.couple(x, big_a[0], y, innermost, np.arange(n), np.arange(n) % b[innermost])
                coupled[innermost] = big_a[0]
            else:
                attention = _feeds_attention(c, y)
                selected = _selected_downstream(c, y)
                unit_axis = next((k for k in big_b if k not in selected), big_b[0])
                if attention and c.head_dims:
                    unit_axis = big_b[-1]
                inner = math.prod(b[k] for k in big_b if k > unit_axis)
                c.couple(x, big_a[0], y, unit_axis, np.arange(n), (np.arange(n) // inner) % b[unit_axis])
                coupled[unit_axis] = big_a[0]
                if attention:
                    c.tag(y, unit_axis, "head_dims" if c.head_dims else "heads")
    return coupled


def _couple_outer_slabs(
    c: Coupler, x: str, y: str, sizes_a: list[int], sizes_b: list[int], outer_a: int, outer_b: int
) -> bool:
    """A block that merges and splits at once (``[C, H, W] -> [G, C/G * H * W]``, GroupNorm's
    reshape): element i of the outer input axis is the contiguous slab of ``inner_a`` elements
    starting at ``i * inner_a``, element j of the outer output axis that of ``inner_b``. When one
    inner size divides the other, every slab of the coarser side is a whole number of slabs of
    the finer side, so removing one coarse element and the fine elements inside it keeps the
    rest in order: input element i couples with output element ``i // (inner_b / inner_a)`` (or
    the reverse). The inner axes are barriers. Otherwise nothing couples (returns False)."""
    inner_a, inner_b = math.prod(sizes_a[1:]), math.prod(sizes_b[1:])
    if inner_b % inner_a == 0:
        fine, coarse, fine_axis, coarse_axis, ratio = x, y, outer_a, outer_b, inner_b // inner_a
    elif inner_a % inner_b == 0:
        fine, coarse, fine_axis, coarse_axis, ratio = y, x, outer_b, outer_a, inner_a // inner_b
    else:
        return False
    n = c.shape(fine)[fine_axis]
    c.couple(fine, fine_axis, coarse, coarse_axis, np.arange(n), np.arange(n) // ratio)
    return True


def _through_transposes(c: Coupler, name: str) -> list["Node"]:
    """The consumers of ``name``, looking through Transpose nodes."""
    found = []
    for node in c.consumers(name):
        if node.op_type == "Transpose":
            found += _through_transposes(c, node.outputs[0])
        else:
            found.append(node)
    return found


def _selected_downstream(c: Coupler, name: str, to_origin: list[int] | None = None) -> set[int]:
    """Axes of ``name`` that a consumer (looking through Transposes) slices, gathers or
    splits along."""
    rank = len(c.shape(name))
    to_origin = to_origin if to_origin is not None else list(range(rank))
    found: set[int] = set()
    for node in c.consumers(name):
        if node.op_type == "Transpose":
            perm = node.attr("perm") or list(reversed(range(rank)))
            found |= _selected_downstream(c, node.outputs[0], [to_origin[p] for p in perm])
        elif node.op_type in ("Gather", "Split"):
            found.add(to_origin[normalize_axis(int(node.attr("axis", 0)), rank)])
        elif node.op_type == "Slice":
            try:
                axes = node.attr("axes") if c.opset < 10 else int_param(node, c, "axes", 3)
            except Unsupported:
                axes = None
            found |= {to_origin[normalize_axis(a, rank)] for a in (axes or range(rank))}
    return found


def _followed_by_shuffle(c: Coupler, name: str) -> bool:
    direct = c.consumers(name)
    return (
        len(direct) == 1 and direct[0].op_type == "Transpose"
        and all(n.op_type in ("Reshape", "Flatten") for n in _through_transposes(c, name))
    )


def _repeats_inner_axis(c: Coupler, x: str, inner: int) -> bool:
    """Whether ``x`` is an Expand that broadcasts its axis ``inner`` from size 1: grouped-query
    attention repeating each key/value head for the query heads of its group
    (``[B, KV, 1, S, D] -> [B, KV, R, S, D]``, then merged into ``KV * R`` heads)."""
    node = c.producer(x)
    if node is None or node.op_type != "Expand":
        return False
    source = c.shape(node.inputs[0])
    k = inner - (len(c.shape(x)) - len(source))
    return k < 0 or source[k] == 1


def _comes_from_attention(c: Coupler, name: str) -> bool:
    """Whether ``name`` is (through Transposes) the product of two activations (P·V)."""
    node = c.producer(name)
    while node is not None and node.op_type == "Transpose":
        node = c.producer(node.inputs[0])
    return node is not None and node.op_type == "MatMul" and not any(c.is_constant(i) for i in node.inputs)


def _comes_from_recurrent(c: Coupler, name: str) -> bool:
    """Whether ``name`` is (through Transposes) a recurrent node's Y, whose hidden units are the
    innermost axis of a [directions, hidden] merge."""
    node = c.producer(name)
    while node is not None and node.op_type == "Transpose":
        node = c.producer(node.inputs[0])
    return node is not None and node.op_type in ("RNN", "GRU", "LSTM")


_ON_THE_WAY_TO_ATTENTION = ("Transpose", "Slice", "Squeeze", "Unsqueeze", "Gather", "Split", "Mul", "Div")


def _feeds_attention(c: Coupler, name: str, depth: int = 4) -> bool:
    """Whether the split tensor reaches a product of two activations (Q·Kᵀ, P·V) through a
    few data-movement or scaling ops; only labels the group as heads in reports."""
    for node in c.consumers(name):
        if node.op_type == "MatMul" and not any(c.is_constant(i) for i in node.inputs):
            return True
        if depth and node.op_type in _ON_THE_WAY_TO_ATTENTION:
            if any(_feeds_attention(c, out, depth - 1) for out in node.outputs if out):
                return True
    return False


@register_op("Flatten")
class Flatten(OpRule):
    """``[d0..dk-1, dk..] -> [prod(d0..dk-1), prod(dk..)]``: a merge (see module docstring)."""

    summary = "merge: features of channel c are the slab c*HW..(c+1)*HW-1"

    def couple(self, node: "Node", c: Coupler) -> None:
        couple_reshape(c, node.inputs[0], node.outputs[0])


@register_op("Reshape")
class Reshape(OpRule):
    """Coupled by blocks of the input and output shapes. A constant target is rewritten
    (``-1`` and ``0`` entries are kept where their axis keeps its size); a run-time target is
    followed symbolically (see the module docstring); an entry computed by arithmetic
    (``c // 2`` in a channel shuffle) must be right at every size pruning can leave
    (:func:`~spa_compiler.ops.runtime_shapes.follows_pruning`), or its axis and the axes it reads keep their sizes."""

    summary = "identity/merge/split (heads) blocks; constant or run-time target rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        x, target, y = node.inputs[0], node.inputs[1], node.outputs[0]
        coupled = couple_reshape(c, x, y)
        if c.is_constant(target):
            return
        value = c.shape_value(target)
        if value is None or any(e is None for e in value) or len(value) != len(c.shape(y)):
            for d in set().union(*(dims_of(e) for e in value or [])):
                c.block(d.tensor, d.axis, "it sizes a run-time Reshape target spa-prune cannot follow")
            raise Unsupported(f"its target shape '{target}' is computed at run time in a way spa-prune cannot follow")
        for k, element in enumerate(value):
            if isinstance(element, Dim):
                couple_sized_by(c, x, y, k, element)
            elif isinstance(element, Expr):
                couple_computed_entry(c, x, y, k, element, coupled.get(k))
            elif element.value != -1 and c.shape_value_escapes(element.source):
                c.block(y, k, f"the shape constant '{element.source}' sizing axis {k} is also used elsewhere")
            elif element.value != -1:
                c.share((element.source, element.index), y, k)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        y, target = node.outputs[0], node.inputs[1]
        old, new = r.old_shape(y), r.new_shape(y)
        if old == new:
            return
        if not r.is_constant(target):
            for k, element in enumerate(r.shape_value(target)):
                if old[k] != new[k] and isinstance(element, Const) and element.value != -1:
                    r.set_constant_element(element.source, element.index, new[k])
            return
        values = [int(v) for v in r.constant(target).reshape(-1)]
        for k, value in enumerate(values):
            if old[k] != new[k] and value != -1:
                values[k] = new[k]
        r.set_input(node, 1, np.asarray(values, dtype=np.int64))


@register_op("Shape")
class Shape(OpRule):
    """Reads sizes, not values: the input may lose channels when every use of the result is
    followed symbolically (run-time Reshape targets), which then keeps the sizes consistent."""

    summary = "input axes free when the shape value only feeds followed Reshape targets"

    def couple(self, node: "Node", c: Coupler) -> None:
        if c.shape_value_escapes(node.outputs[0]):
            raise Unsupported("its value is used in a way spa-prune cannot follow")
        x = node.inputs[0]
        for axis in range(len(c.shape(x))):
            c.free(x, axis)


@register_op("Expand")
class Expand(OpRule):
    """Broadcasts to a constant shape: input axes of the output's size are identity; an axis
    broadcast from size 1 may lose repeats; target entries other than 1 on a pruned axis are
    rewritten."""

    summary = "broadcast: equal-size axes identity; shape rewritten"

    def couple(self, node: "Node", c: Coupler) -> None:
        if not c.is_constant(node.inputs[1]):
            raise Unsupported(f"its shape input '{node.inputs[1]}' is computed at run time")
        x, y = node.inputs[0], node.outputs[0]
        couple_broadcast(c, [x], y)
        source, shape = c.shape(x), c.shape(y)
        for k, size in enumerate(shape):  # a repeated axis loses repeats: its target entry is rewritten
            j = k - (len(shape) - len(source))
            if size > 1 and (j < 0 or source[j] == 1):
                c.free(y, k)

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        y = node.outputs[0]
        old, new = r.old_shape(y), r.new_shape(y)
        target = [int(v) for v in r.constant(node.inputs[1]).reshape(-1)]
        offset = len(old) - len(target)
        rewritten = [
            new[offset + k] if value != 1 and old[offset + k] != new[offset + k] else value
            for k, value in enumerate(target)
        ]
        if rewritten != target:
            r.set_input(node, 1, np.asarray(rewritten, dtype=np.int64))


@register_op("Tile")
class Tile(OpRule):
    """Axes repeated once are identity; repeated axes are barriers."""

    summary = "axes with repeat 1 identity"

    def couple(self, node: "Node", c: Coupler) -> None:
        repeats = int_param(node, c, "repeats", 1)
        x, y = node.inputs[0], node.outputs[0]
        couple_same(c, x, y, [k for k, rep in enumerate(repeats) if rep == 1])
