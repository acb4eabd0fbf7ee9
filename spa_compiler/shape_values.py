"""Symbolic values of run-time shape computations.

Exporters compute Reshape targets at run time when shapes are dynamic: PyTorch writes
``x.view(x.size(0), x.size(1), 12, 64)`` as ``Shape -> Gather -> Unsqueeze -> Concat`` with constant
head counts. This module evaluates such small integer subgraphs symbolically: every element of
a shape-like tensor is either

* ``Dim(tensor, axis)``: the run-time size of that axis (it follows pruning by itself once the
  consumer's axis is coupled with it), or
* ``Const(value, source, index)``: element ``index`` of the constant ``source`` (the rewriter
  changes it there when the axis it sizes loses channels), or
* ``Expr(op, left, right)``: integer arithmetic (``Add``, ``Sub``, ``Mul``, ``Div`` truncating) of
  two elements, as ``torch.chunk`` bounds are computed (``(C + 1) // 2 * k``); :func:`evaluate`
  gives its value for any sizes of the axes it reads, so a rule can check that it stays right
  whatever is pruned, or
* ``None``: unknown (data-dependent values): the consumer is then a barrier.

Only ``Shape``, ``Gather``, ``Slice``, ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Cast``, ``Identity``, a
``Reshape`` to one axis, the integer arithmetic above over 0-D/1-D integer tensors, and the
``Where(Equal(target, -1), 1, target)`` by which the classic exporter writes ``expand``'s
target (an ``Equal`` known where it compares constants, or a size with a negative constant;
a ``Where`` whose every condition is known) are followed; a shape value read by anything else
*escapes*, and the axes whose sizes it carries keep all their channels. A constant read by
arithmetic escapes too (rewriting it would change the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Union

import numpy as np

from .ir import Graph, Node

__all__ = ["Dim", "Const", "Expr", "Element", "ShapeValues", "SHAPE_TARGET_SLOTS", "evaluate", "dims_of"]


@dataclass(frozen=True)
class Dim:
    tensor: str
    axis: int


@dataclass(frozen=True)
class Const:
    value: int
    source: str
    index: int


@dataclass(frozen=True)
class Expr:
    op: str
    left: "Element"
    right: "Element"


Element = Union[Dim, Const, Expr, None]

_ARITHMETIC = {"Add", "Sub", "Mul", "Div"}
_INTEGER_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # onnx uint8/int8/uint16/int16/int32/int64/uint32/uint64
_FOLLOWED = {"Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Reshape", "Equal",
             "Where", *_ARITHMETIC}
# inputs that read a shape value and whose rules understand a symbolic one
SHAPE_TARGET_SLOTS = {("Reshape", 1), ("Slice", 1), ("Slice", 2), ("Expand", 1), ("ConstantOfShape", 0)}


def _truncating_division(a: int, b: int) -> int | None:
    if b == 0:
        return None
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b > 0) else -quotient


_OPERATIONS: dict[str, Callable[[int, int], int | None]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": _truncating_division,
}


def evaluate(element: Element, size: Callable[[Dim], int]) -> int | None:
    """The integer value of ``element`` when each axis ``Dim`` has ``size(dim)`` elements
    (None when it is unknown or divides by zero).

    >>> evaluate(Expr("Div", Expr("Add", Dim("x", 1), Const(1, "c", 0)), Const(2, "d", 0)), lambda d: 63)
    32
    """
    if isinstance(element, Dim):
        return size(element)
    if isinstance(element, Const):
        return element.value
    if isinstance(element, Expr):
        left, right = evaluate(element.left, size), evaluate(element.right, size)
        return None if left is None or right is None else _OPERATIONS[element.op](left, right)
    return None


def dims_of(element: Element) -> set[Dim]:
    """The axes whose run-time sizes ``element`` reads."""
    if isinstance(element, Dim):
        return {element}
    if isinstance(element, Expr):
        return dims_of(element.left) | dims_of(element.right)
    return set()


class ShapeValues:
    """Symbolic values of every shape-like tensor of a graph, and which Shape nodes escape."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.values: dict[str, list[Element]] = {}
        self.derived: set[str] = set()  # tensors computed from some Shape
        for node in graph.nodes:
            if node.op_type in _FOLLOWED and node.domain in ("", "ai.onnx"):
                self._evaluate(node)

    def value(self, name: str) -> list[Element] | None:
        if name in self.values:
            return self.values[name]
        constant = self.graph.constants.get(name)
        if constant is not None and constant.ndim <= 1 and np.issubdtype(constant.dtype, np.integer):
            return [Const(int(v), name, k) for k, v in enumerate(constant.reshape(-1))]
        return None

    def escapes(self, name: str) -> bool:
        """Whether the shape value ``name`` (or a constant feeding shape values) reaches anything
        but followed ops and shape targets (:data:`SHAPE_TARGET_SLOTS`): then what it sizes must
        not change."""
        return next(self._escaping(name), None) is not None

    def escaping_dims(self, name: str) -> set[Dim] | None:
        """The axes whose run-time sizes reach, through the shape value ``name``, anything but
        followed ops and shape targets (DeBERTa's ``sqrt(q.size(-1) * 3)`` reads the head
        dimension, not the heads): those sizes must not change, the others may. None when an
        escaping value is not known symbolically."""
        read: set[Dim] = set()
        for escaping in self._escaping(name):
            value = self.values.get(escaping)
            if value is None or any(element is None for element in value):
                return None
            read.update(*(dims_of(element) for element in value))
        return read

    def _escaping(self, name: str) -> Iterator[str]:
        """The tensors, among ``name`` and the shape values computed from it, that something
        other than a followed op or a shape target reads."""
        pending, seen = [name], set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self.graph.outputs:
                yield name
            for consumer in self.graph.consumers.get(name, []):
                slots = {k for k, n in enumerate(consumer.inputs) if n == name}
                if all((consumer.op_type, k) in SHAPE_TARGET_SLOTS for k in slots) and (
                    consumer.op_type == "Reshape" or name in self.derived
                ):
                    continue
                if consumer.op_type not in _FOLLOWED or consumer.outputs[0] not in self.values \
                        or (consumer.op_type in _ARITHMETIC and name not in self.derived):
                    yield name
                    continue
                pending.extend(o for o in consumer.outputs if o)

    def _evaluate(self, node: Node) -> None:
        result = self._compute(node)
        if result is not None:
            self.values[node.outputs[0]] = result
            self.derived.add(node.outputs[0])

    def _compute(self, node: Node) -> list[Element] | None:
        op = node.op_type
        if op == "Shape":
            shape = self.graph.shapes.get(node.inputs[0])
            if shape is None:
                return None
            rank = len(shape)
            start, end = int(node.attr("start", 0)), node.attr("end")
            start = max(0, start + rank if start < 0 else start)
            end = rank if end is None else max(0, int(end) + rank if int(end) < 0 else int(end))
            return [Dim(node.inputs[0], a) for a in range(start, min(end, rank))]
        if op == "Concat":
            return self._concat(node)
        if op in _ARITHMETIC:
            return self._arithmetic(node)
        if op == "Equal":
            return self._equal(node)
        if op == "Where":
            return self._where(node)
        if not node.inputs or node.inputs[0] not in self.derived:
            return None
        source = self.values[node.inputs[0]]
        if op in ("Cast", "Identity", "Unsqueeze", "Squeeze"):
            return list(source)
        if op == "Reshape":  # to one axis of as many elements, as [-1]
            return list(source) if self.graph.shapes.get(node.outputs[0]) == (len(source),) else None
        if op == "Gather":
            return self._gather(node, source)
        return self._slice(node, source)

    def _indices(self, name: str) -> list[int] | None:
        constant = self.graph.constants.get(name)
        return None if constant is None else [int(v) for v in constant.reshape(-1)]

    def _gather(self, node: Node, source: list[Element]) -> list[Element] | None:
        indices = self._indices(node.inputs[1])
        if indices is None or int(node.attr("axis", 0)) != 0:
            return None
        n = len(source)
        return [source[i + n if i < 0 else i] for i in indices]

    def _slice(self, node: Node, source: list[Element]) -> list[Element] | None:
        if "starts" in node.attrs:
            starts, ends, steps = node.attrs["starts"], node.attrs["ends"], None
        else:
            starts, ends = self._indices(node.inputs[1]), self._indices(node.inputs[2])
            steps = self._indices(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
        if starts is None or ends is None:
            return None
        return source[slice(int(starts[0]), int(ends[0]), int(steps[0]) if steps else 1)]

    def _arithmetic(self, node: Node) -> list[Element] | None:
        """Element-wise integer arithmetic of two shape values (one may be a single element,
        broadcast); division only on integer tensors, where it truncates."""
        if len(node.inputs) != 2 or not any(name in self.derived for name in node.inputs):
            return None
        if self.graph.dtypes.get(node.outputs[0]) not in _INTEGER_TYPES:
            return None
        pair = self._pair(node, 0)
        if pair is None or any(e is None for e in [*pair[0], *pair[1]]):
            return None
        return [Expr(node.op_type, a, b) for a, b in zip(*pair)]

    def _pair(self, node: Node, first: int) -> tuple[list[Element], list[Element]] | None:
        """Inputs ``first`` and ``first + 1``'s values, one broadcast to the other's length."""
        left, right = self.value(node.inputs[first]), self.value(node.inputs[first + 1])
        if left is None or right is None or (len(left) != len(right) and 1 not in (len(left), len(right))):
            return None
        n = max(len(left), len(right))
        return (left * n if len(left) == 1 else left), (right * n if len(right) == 1 else right)

    def _equal(self, node: Node) -> list[Element] | None:
        """``Equal`` of a shape value and constants, as exporters test a target for ``-1``: 1 or 0
        where it is known (two constants; a size and a negative constant, which it never is)."""
        pair = self._pair(node, 0) if any(name in self.derived for name in node.inputs) else None
        if pair is None:
            return None
        result = []
        for k, (a, b) in enumerate(zip(*pair)):
            if isinstance(a, Const) and isinstance(b, Const):
                equal = a.value == b.value
            elif isinstance(a, Dim) and isinstance(b, Const) and b.value < 0 \
                    or isinstance(b, Dim) and isinstance(a, Const) and a.value < 0:
                equal = False
            else:
                return None
            result.append(Const(int(equal), node.outputs[0], k))
        return result

    def _where(self, node: Node) -> list[Element] | None:
        """``Where(condition, a, b)`` element by element, when every condition is known."""
        condition = self.values.get(node.inputs[0]) if node.inputs[0] in self.derived else None
        pair = self._pair(node, 1)
        if condition is None or pair is None or len(condition) not in (1, len(pair[0])) \
                or not all(isinstance(chosen, Const) for chosen in condition):
            return None
        condition = condition * len(pair[0]) if len(condition) == 1 else condition
        return [a if chosen.value else b for chosen, a, b in zip(condition, *pair)]

    def _concat(self, node: Node) -> list[Element] | None:
        parts = [self.value(name) for name in node.inputs]
        if any(p is None for p in parts) or not any(name in self.derived for name in node.inputs):
            return None
        return [e for part in parts for e in part]
