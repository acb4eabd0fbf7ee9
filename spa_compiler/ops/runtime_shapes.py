"""Sizes computed at run time, followed through pruning (issue 7): the bounds of a ``torch.chunk``
(``Shape -> Gather -> Add -> Div -> Mul -> Slice``), Reshape target entries computed by arithmetic
(``c // 2`` in a channel shuffle) and target entries that are the run-time size of a tensor the
data was relaid from (``Shape(x)`` ending a channel shuffle).

An entry computed at run time cannot be rewritten; it is right after pruning only if it evaluates,
at every size pruning can leave, to the size the pruned tensor then has. The functions here check
exactly that with :func:`spa_compiler.shape_values.evaluate` and declare the couplings under which
it holds; anything else keeps its size (the axes the entry reads are blocked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..shape_values import Const, Dim, Element, Expr, dims_of, evaluate
from .common import int_param
from .registry import Coupler, Rewriter, Unsupported, normalize_axis

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "clamp", "bounds_at_run_time", "chunk_length", "couple_run_time_slice", "couple_sized_by",
    "follows_pruning", "couple_computed_entry",
]


def clamp(value: int, dim: int) -> int:
    value = value + dim if value < 0 else value
    return min(max(value, 0), dim)


def bounds_at_run_time(node: "Node", c: Coupler | Rewriter) -> bool:
    return c.opset >= 10 and any(not c.is_constant(name) for name in node.inputs[1:3])


def chunk_length(start: Element, end: Element, size: int) -> int | None:
    """The chunk length L when ``[start, end)`` is chunk j of an axis of ``size`` cut into
    ``k = size / L`` equal chunks *and stays so* whatever the pruning that removes the same
    positions from every chunk: for every r < L, at size ``size - k*r`` the bounds (evaluated
    with that size, clamped) are ``j*(L - r)`` and ``(j + 1)*(L - r)``. None otherwise.

    >>> half = Expr("Div", Expr("Add", Dim("x", 1), Const(1, "one", 0)), Const(2, "two", 0))
    >>> chunk_length(half, Expr("Mul", half, Const(2, "two", 0)), 64)   # second half of 64
    32
    """
    def bounds(n: int) -> tuple[int, int] | None:
        s, e = evaluate(start, lambda _: n), evaluate(end, lambda _: n)
        return None if s is None or e is None else (clamp(s, n), clamp(e, n))

    first = bounds(size)
    if first is None or first[1] <= first[0]:
        return None
    length = first[1] - first[0]
    if size % length or first[0] % length:
        return None
    chunks, index = size // length, first[0] // length
    for r in range(1, length):
        kept = length - r
        if bounds(size - chunks * r) != (index * kept, (index + 1) * kept):
            return None
    return length


def couple_run_time_slice(node: "Node", c: Coupler) -> None:
    """Slice bounds computed at run time (``Shape -> Gather -> Add/Div/Mul``). A sliced axis
    whose bounds read only its own size (or that of an axis of the same size, then coupled with
    it) and form a chunk (:func:`chunk_length`) couples position i of every chunk together
    (input element i with ``i % L``), so each chunk keeps the same positions, and the chunk
    with the output; the bounds then follow the pruned size by themselves. Any other sliced
    axis keeps its size, and so do the axes its bounds read."""
    x, y = node.inputs[0], node.outputs[0]
    shape = c.shape(x)
    starts, ends = c.shape_value(node.inputs[1]), c.shape_value(node.inputs[2])
    read = set().union(*(dims_of(e) for e in [*(starts or []), *(ends or [])]))
    try:
        if starts is None or ends is None or len(starts) != len(ends):
            raise Unsupported("its bounds are computed at run time in a way spa-prune cannot follow")
        axes = [normalize_axis(a, len(shape)) for a in (int_param(node, c, "axes", 3) or range(len(starts)))]
        steps = int_param(node, c, "steps", 4) or [1] * len(starts)
    except Unsupported:
        for d in read:  # the sizes the bounds read must not change under a barrier
            c.block(d.tensor, d.axis, "it sizes the run-time bounds of a Slice spa-prune cannot follow")
        raise
    sliced = {axis: (starts[k], ends[k], steps[k]) for k, axis in enumerate(axes)}
    for axis, size in enumerate(shape):
        if axis not in sliced:
            c.couple(x, axis, y, axis)
            continue
        start, end, step = sliced[axis]
        dims = dims_of(start) | dims_of(end)
        dim = next(iter(dims)) if len(dims) == 1 else None
        length = chunk_length(start, end, size) if step == 1 and len(dims) <= 1 else None
        if length is None or (dim is not None and c.shape(dim.tensor)[dim.axis] != size):
            for d in dims:
                c.block(d.tensor, d.axis, f"it reads the size of this axis to compute the bounds of axis {axis}")
            continue
        if dim is not None:
            couple_sized_by(c, x, x, axis, dim)
        first = clamp(evaluate(start, lambda _: size), size)
        c.couple(x, axis, x, axis, np.arange(size), np.arange(size) % length)
        c.couple(x, axis, y, axis, np.arange(first, first + length), np.arange(length))


_RELAYOUT = ("Reshape", "Transpose", "Flatten", "Identity")


def _relayout_positions(c: Coupler, source: str, axis: int, x: str, y: str, k: int) -> np.ndarray | None:
    """When ``x`` is ``source`` moved by Reshape/Transpose only (a channel shuffle), the element of
    ``source``'s ``axis`` that lands at each position of axis ``k`` of ``y`` (``x`` itself, ``x``
    reshaped, or ``x`` expanded: a meshgrid's ``arange(h).view(-1, 1).expand(h, w)``), found by
    moving the indices themselves; None when there is no such chain, the axis is mixed with
    others, or ``y`` repeats an element along it."""
    chain, name = [], x
    while name != source:
        node = c.producer(name)
        if node is None or node.op_type not in _RELAYOUT or len(chain) > 8:
            return None
        chain.append(node)
        name = node.inputs[0]
    shape = c.shape(source)
    moved = np.broadcast_to(
        np.arange(shape[axis], dtype=np.int32).reshape([-1 if d == axis else 1 for d in range(len(shape))]), shape
    )
    for node in reversed(chain):
        if node.op_type == "Transpose":
            moved = np.transpose(moved, node.attr("perm") or None)
        else:
            moved = moved.reshape(c.shape(node.outputs[0]))
    shape = c.shape(y)
    if moved.size == int(np.prod(shape)):
        moved = moved.reshape(shape)
    else:
        try:
            moved = np.broadcast_to(moved, shape)
        except ValueError:
            return None
    per_position = np.moveaxis(moved, k, 0).reshape(shape[k], -1)
    positions = per_position[:, 0]
    if not (per_position == per_position[:, :1]).all() or np.unique(positions).size != positions.size:
        return None
    return positions


def couple_sized_by(c: Coupler, x: str, y: str, k: int, dim: Dim) -> None:
    """Axis ``k`` of ``y`` (a reshape of ``x``, or ``x``) has the run-time size of ``dim``'s axis,
    so they lose the same number of elements: position by position as the data moves when ``x``
    is that tensor relaid out (the target ``Shape(x0)`` that ends a channel shuffle), else index
    for index."""
    axis = normalize_axis(dim.axis, len(c.shape(dim.tensor)))
    if (dim.tensor, axis) == (y, k):
        return
    positions = _relayout_positions(c, dim.tensor, axis, x, y, k) if dim.tensor != x else None
    if positions is None:
        c.couple(y, k, dim.tensor, dim.axis)
    else:
        c.couple(y, k, dim.tensor, dim.axis, np.arange(positions.size), positions)


def couple_run_time_target(c: Coupler, kind: str, x: str, target: str, y: str, keep: int | None,
                           computed: Callable[[int, Expr], None] | None = None) -> None:
    """Couple the entries of a ``kind`` node's target shape computed at run time (a Reshape's,
    an Expand's, a ConstantOfShape's), read symbolically: an entry that is the size of an axis
    couples that axis with the output axis it sizes; one computed by arithmetic goes to
    ``computed`` (None: not followed); a constant entry other than ``keep`` (Reshape's -1,
    Expand's 1: the size left to the input; None where every entry is a size) is shared by the
    axes it sizes and rewritten at its source, unless something else reads it. When an entry is
    not followed, the axes the target reads keep their sizes and Unsupported is raised."""
    value = c.shape_value(target)
    if value is None or len(value) != len(c.shape(y)) \
            or any(e is None or (isinstance(e, Expr) and computed is None) for e in value):
        for d in set().union(*(dims_of(e) for e in value or [])):
            c.block(d.tensor, d.axis, f"it sizes a run-time {kind} target spa-prune cannot follow")
        raise Unsupported(f"its target shape '{target}' is computed at run time in a way spa-prune cannot follow")
    for k, element in enumerate(value):
        if isinstance(element, Dim):
            couple_sized_by(c, x, y, k, element)
        elif isinstance(element, Expr):
            computed(k, element)
        elif element.value != keep and c.shape_value_escapes(element.source):
            c.block(y, k, f"the shape constant '{element.source}' sizing axis {k} is also used elsewhere")
        elif element.value != keep:
            c.share((element.source, element.index), y, k)


def rewrite_run_time_target(r: Rewriter, target: str, y: str, keep: int | None) -> None:
    """Write the new size of every axis of ``y`` that lost elements into the constant entry of
    the run-time ``target`` that sizes it (see :func:`couple_run_time_target`)."""
    old, new = r.old_shape(y), r.new_shape(y)
    for k, element in enumerate(r.shape_value(target)):
        if old[k] != new[k] and isinstance(element, Const) and element.value != keep:
            r.set_constant_element(element.source, element.index, new[k])


def follows_pruning(element: Element, size_in: int, size_out: int) -> bool:
    """Whether an entry computed from the size of one input axis (``size_in``) sizes an output
    axis (``size_out``) that loses ``size_out / size_in`` of an element per element that input
    axis loses, rightly at every size: ``element(size_in - e) == size_out - e * size_out / size_in``
    for every removal ``e`` that leaves whole elements.

    >>> follows_pruning(Expr("Div", Dim("x", 1), Const(2, "two", 0)), 64, 32)
    True
    """
    for e in range(size_in):
        if (e * size_out) % size_in == 0:
            if evaluate(element, lambda _: size_in - e) != size_out - e * size_out // size_in:
                return False
    return True


def couple_computed_entry(c: Coupler, x: str, y: str, k: int, element: Expr, source_axis: int | None) -> None:
    """Output axis ``k`` is sized by arithmetic of run-time sizes. When it reads one axis the
    size of the input axis that axis ``k`` shrinks with, and follows pruning, that axis couples
    with the input axis; otherwise output axis ``k`` and every axis the entry reads keep their sizes."""
    dims = dims_of(element)
    dim = next(iter(dims)) if len(dims) == 1 else None
    if (
        dim is not None and source_axis is not None
        and c.shape(dim.tensor)[dim.axis] == c.shape(x)[source_axis]
        and follows_pruning(element, c.shape(x)[source_axis], c.shape(y)[k])
    ):
        couple_sized_by(c, x, x, source_axis, dim)
        return
    for d in dims:
        c.block(d.tensor, d.axis, f"its size is read by arithmetic sizing axis {k} of '{y}'")
    c.block(y, k, "its size is computed by arithmetic spa-prune cannot follow through pruning")
