"""Helpers shared by op rules: parameters that live in attributes or inputs, and common couplings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .registry import Coupler, Rewriter, Unsupported, normalize_axis

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "int_param",
    "write_int_param",
    "input_at",
    "output_at",
    "couple_same",
    "couple_broadcast",
    "couple_except",
]


def input_at(node: "Node", slot: int) -> str:
    """Name of input ``slot`` or "" when the optional input is absent."""
    return node.inputs[slot] if slot < len(node.inputs) else ""


def output_at(node: "Node", slot: int) -> str:
    """Name of output ``slot`` or "" when the optional output is absent."""
    return node.outputs[slot] if slot < len(node.outputs) else ""


def int_param(node: "Node", c: Coupler | Rewriter, attr: str, slot: int | None) -> list[int] | None:
    """An integer list held in attribute ``attr`` (older opsets) or constant input ``slot``.

    Returns None when neither is given; raises :class:`Unsupported` when the input is computed
    at run time, since the rule then cannot know (or rewrite) its value.
    """
    if attr in node.attrs:
        value = node.attrs[attr]
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    name = input_at(node, slot) if slot is not None else ""
    if not name:
        return None
    if not c.is_constant(name):
        raise Unsupported(f"its '{attr}' input '{name}' is computed at run time")
    return [int(v) for v in np.asarray(c.constant(name)).reshape(-1)]


def write_int_param(node: "Node", r: Rewriter, attr: str, slot: int, values: list[int]) -> None:
    """Write back a parameter read by :func:`int_param`, where it came from, an input in the
    integer type it had (a Slice's starts, ends, axes and steps must share theirs: int32 in a
    TensorFlow export)."""
    if attr in node.attrs:
        r.set_attr(node, attr, [int(v) for v in values])
    else:
        r.set_input(node, slot, np.asarray(values, dtype=np.asarray(r.constant(node.inputs[slot])).dtype))


def couple_same(c: Coupler, a: str, b: str, axes: range | list[int] | None = None) -> None:
    """Couple axis k of ``a`` with axis k of ``b`` for the given axes (all by default)."""
    for axis in axes if axes is not None else range(len(c.shape(a))):
        c.couple(a, axis, b, axis)


def couple_except(c: Coupler, a: str, b: str, skip: set[int]) -> None:
    """Couple equal axes of same-rank ``a`` and ``b`` except those in ``skip``."""
    couple_same(c, a, b, [k for k in range(len(c.shape(a))) if k not in skip])


def couple_broadcast(c: Coupler, inputs: list[str], output: str) -> None:
    """Numpy broadcasting: an input axis of the output's size couples with it; size-1 axes
    that broadcast couple nothing (and so are never removed)."""
    out_shape = c.shape(output)
    rank = len(out_shape)
    for name in inputs:
        if not name:
            continue
        shape = c.shape(name)
        for k, size in enumerate(shape):
            out_axis = rank - len(shape) + k
            if size == out_shape[out_axis]:
                c.couple(name, k, output, out_axis)


def normalized_axes(axes: list[int], rank: int) -> list[int]:
    return sorted(normalize_axis(a, rank) for a in axes)
