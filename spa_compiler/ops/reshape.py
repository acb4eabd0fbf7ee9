"""Reshape and Flatten: ops that regroup axes.

Reshape and Flatten are described by blocks: both shapes are cut into the shortest runs of axes
whose sizes multiply to the same number. A run of one axis on each side is identity. A *merge*
(input axes ``a0, a1, ...`` into one output axis, as Flatten does with ``C, H, W``) couples output
element ``f`` with element ``f // (|a1| * |a2| * ...)`` of the outermost input axis ``a0``: removing
channel c removes the slab of features ``c*HW .. (c+1)*HW - 1``; the inner axes are barriers.
Where a permute put the channels inside the merge (``[N, C, T] -> [N, T, C] -> [N, T*C]``, found
by :func:`~spa_compiler.ops.patterns.channel_axis`), element ``f`` is element
``(f // inner) % |ak|`` of the channel axis ``ak``, ``inner`` the product of the merged sizes
after it: channel c is features ``c, C + c, 2C + c, ...`` (times ``inner``); the other axes are
barriers. A
*split* (one input axis into ``b0, b1, ...``) couples input element i with its digit on one
output axis ``bk``, ``(i // (|b(k+1)| * ...)) % |bk|``: the outermost axis that nothing downstream
slices, gathers or splits along, or, outside attention, the axis the layers reading the result
take for channels (:func:`~spa_compiler.ops.patterns.channel_axis_read`: a channels-last split
before a convolution). Hidden index ``h*D + d`` belongs to head h, so heads (or
groups) leave whole and the merge back ``[H, D] -> H*D`` maps them again; a fused projection
split as ``[3, H, D]`` and then sliced into q, k, v couples on H. The other axes of the split
are never pruned. A split that a
Transpose and a Reshape follow is a channel shuffle: there input element i couples with element
``i % |b_last|`` of the innermost axis, removing the same position from every group, which the
merge of the transposed axes maps exactly. A block that merges and splits at once (GroupNorm's
``[N, C, H, W] -> [N, G, C/G * H * W]``) couples its outer axes slab by slab when one inner size
divides the other, so that whole groups of channels leave together; and its innermost axes when
one size divides the other (``[P, C] -> [P/r, r*C]``, r positions' channels side by side):
channel c is every element ``c mod C`` of the wider axis. Any other regrouping is a barrier.

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

from .patterns import (
    channel_axis, channel_axis_read, comes_from_attention, comes_from_recurrent, feeds_attention, followed_by_shuffle,
    repeats_inner_axis, selected_downstream,
)
from .registry import Coupler, OpRule, Rewriter, Unsupported, register_op
from .runtime_shapes import couple_computed_entry, couple_run_time_target, rewrite_run_time_target

if TYPE_CHECKING:
    from ..ir import Node

__all__ = ["Flatten", "Reshape", "reshape_blocks", "couple_reshape"]


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
            if len(big_a) == 2 and repeats_inner_axis(c, x, big_a[1]) and c.repeat_merge(y, x, big_a[0]):
                c.block(x, big_a[0], "query heads are pruned within each key/value group, whose key/value heads stay")
                c.couple(y, big_b[0], x, big_a[1], np.arange(n), np.arange(n) % a[big_a[1]])
                coupled[big_b[0]] = big_a[1]
            elif (c.head_dims and comes_from_attention(c, x)) or comes_from_recurrent(c, x):
                innermost = big_a[-1]
                c.couple(y, big_b[0], x, innermost, np.arange(n), np.arange(n) % a[innermost])
                coupled[big_b[0]] = innermost
            else:
                channels = channel_axis(c, x)
                unit_axis = channels if channels in big_a else big_a[0]
                inner = math.prod(a[k] for k in big_a if k > unit_axis)
                c.couple(y, big_b[0], x, unit_axis, np.arange(n), (np.arange(n) // inner) % a[unit_axis])
                coupled[big_b[0]] = unit_axis
        elif len(big_a) > 1 and len(big_b) > 1:
            if _couple_outer_slabs(c, x, y, [a[k] for k in big_a], [b[k] for k in big_b], big_a[0], big_b[0]):
                coupled[big_b[0]] = big_a[0]
            if _couple_innermost_residues(c, x, y, big_a[-1], big_b[-1]):
                coupled[big_b[-1]] = big_a[-1]
        elif len(big_a) == 1 and len(big_b) > 1:
            n = a[big_a[0]]
            if followed_by_shuffle(c, x, y):
                innermost = big_b[-1]
                c.couple(x, big_a[0], y, innermost, np.arange(n), np.arange(n) % b[innermost])
                coupled[innermost] = big_a[0]
            else:
                attention = feeds_attention(c, y)
                selected = selected_downstream(c, y)
                unit_axis = next((k for k in big_b if k not in selected), big_b[0])
                if attention and c.head_dims:
                    unit_axis = big_b[-1]
                elif not attention:
                    read = channel_axis_read(c, y)
                    if read in big_b and read not in selected:
                        unit_axis = read
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


def _couple_innermost_residues(c: Coupler, x: str, y: str, inner_a: int, inner_b: int) -> bool:
    """A block that merges and splits at once whose innermost sizes divide one another
    (``[P, C] -> [P/r, r*C]``: r consecutive positions of C channels side by side, as a model
    that reads a sequence r tokens at a time writes it): the block's flat index ``f`` is element
    ``f mod |inner|`` of each innermost axis, so with ``C`` dividing ``D = r*C``, element j of the
    finer side's ``D`` is element ``j mod C`` of the ``C`` side, and removing channel c removes
    ``c, C + c, ..., (r-1)C + c``; what remains keeps its order. Not where the block leads to or
    comes from attention (``[T, H*D] -> [T*H, D]``): that would prune head dimensions, which
    only ``--head-dims`` asks for. Returns whether it coupled."""
    size_a, size_b = c.shape(x)[inner_a], c.shape(y)[inner_b]
    if size_a == size_b or (size_a % size_b and size_b % size_a):
        return False
    if not c.head_dims and (feeds_attention(c, y) or comes_from_attention(c, x)):
        return False
    fine, fine_axis, coarse, coarse_axis = (y, inner_b, x, inner_a) if size_b > size_a else (x, inner_a, y, inner_b)
    n, period = max(size_a, size_b), min(size_a, size_b)
    c.couple(fine, fine_axis, coarse, coarse_axis, np.arange(n), np.arange(n) % period)
    return True


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
        couple_run_time_target(c, "Reshape", x, target, y, keep=-1,
                               computed=lambda k, entry: couple_computed_entry(c, x, y, k, entry, coupled.get(k)))

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        y, target = node.outputs[0], node.inputs[1]
        old, new = r.old_shape(y), r.new_shape(y)
        if old == new:
            return
        if not r.is_constant(target):
            rewrite_run_time_target(r, target, y, keep=-1)
            return
        values = [int(v) for v in r.constant(target).reshape(-1)]
        for k, value in enumerate(values):
            if old[k] != new[k] and value != -1:
                values[k] = new[k]
        r.set_input(node, 1, np.asarray(values, dtype=np.int64))
