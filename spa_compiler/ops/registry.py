"""The op-rule registry: for each ONNX op, how its channel axes couple and how to rewrite it.

A rule is a class with two methods:

``couple(node, c)``
    declares, through the :class:`Coupler` ``c``, which elements of which axes of the node's
    tensors must be removed together (``c.couple``), which elements the node tolerates losing
    without any coupling because ``rewrite`` fixes it up (``c.free``), which weight axes are
    *roots* where pruning starts (``c.root``), and criterion tags on weights (``c.tag``).
    Every element of every axis of every tensor the node reads or writes that the rule does not
    declare is *blocked*: never removed. Unknown ops have no rule and so block everything.
``rewrite(node, r)``
    edits attributes and parameter inputs (group counts, split sizes, slice bounds, reshape
    targets) once the :class:`Rewriter` ``r`` knows which indices leave every axis. Constant
    tensors are sliced generically; a rule only fixes what slicing cannot express.

A rule for a weighted op also says how the op reads its input channels through a constant
weight (``input_weight``), which is what the criteria that need input statistics (second-order,
activation-aware) and the re-fit use: a new weighted op is one rule class.

Rules register with ``@register_op("Conv", "ConvTranspose", opsets=(1, 23))``; third-party
packages can add rules through the ``spa_prune.op_rules`` entry-point group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

import numpy as np

from ..plugins import load_entry_points

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "OpRule",
    "WeightView",
    "Coupler",
    "Rewriter",
    "Unsupported",
    "register_op",
    "get_rule",
    "registered_ops",
]



class Unsupported(Exception):
    """Raised by a rule that cannot map this node exactly: the node becomes a barrier."""


class Coupler(Protocol):
    """What a rule's ``couple`` may ask of and declare to the analysis."""

    opset: int
    prune_hidden: bool  # the user accepts lossy pruning through normalisations of the hidden axis
    head_dims: bool  # attention reshapes couple head dimensions instead of whole heads

    def shape(self, name: str) -> tuple[int, ...]: ...
    def is_constant(self, name: str) -> bool: ...
    def constant(self, name: str) -> np.ndarray: ...
    def couple(
        self, a: str, a_axis: int, b: str, b_axis: int,
        a_idx: np.ndarray | None = None, b_idx: np.ndarray | None = None,
    ) -> None: ...
    def free(self, name: str, axis: int, idx: np.ndarray | None = None) -> None: ...
    def block(self, name: str, axis: int, reason: str) -> None: ...
    def share(self, key: object, name: str, axis: int) -> None: ...
    def root(self, name: str, axis: int) -> None: ...
    def tag(self, name: str, axis: int, tag: str) -> None: ...
    def shape_value(self, name: str) -> list | None: ...
    def shape_value_escapes(self, name: str) -> bool: ...
    # the axes whose sizes the shape value ``name`` passes to ops no rule follows (None: unknown)
    def shape_value_escaping_dims(self, name: str) -> set | None: ...
    # a merge of repeated key/value heads into ``merged`` (``repeated``'s ``outer`` axis the key/value
    # heads): True when it couples the repeats (query heads within groups) instead of the groups
    def repeat_merge(self, merged: str, repeated: str, outer: int) -> bool: ...
    def consumers(self, name: str) -> list["Node"]: ...
    def producer(self, name: str) -> "Node | None": ...


class Rewriter(Protocol):
    """What a rule's ``rewrite`` may ask of and do to the model being rewritten."""

    opset: int

    def removed(self, name: str, axis: int) -> np.ndarray: ...
    def old_shape(self, name: str) -> tuple[int, ...]: ...
    def new_shape(self, name: str) -> tuple[int, ...]: ...
    def constant(self, name: str) -> np.ndarray: ...
    def is_constant(self, name: str) -> bool: ...
    def set_attr(self, node: "Node", key: str, value: object) -> None: ...
    def set_input(self, node: "Node", slot: int, value: np.ndarray) -> None: ...
    def remove_attr(self, node: "Node", key: str) -> None: ...
    def shape_value(self, name: str) -> list | None: ...
    def set_constant_element(self, name: str, index: int, value: int) -> None: ...
    def consumers(self, name: str) -> list["Node"]: ...


@dataclass(frozen=True)
class WeightView:
    """How a node reads its input's channels through a constant weight: ``y = W x + b`` per
    output position, ``W`` a ``[outputs, channels * prod(kernel)]`` matrix (channel-major, then
    kernel positions), ``x`` the input's channels along ``channel_axis`` (1: channels first, as a
    convolution reads them; -1: the last axis, as a linear layer does), ``bias`` the node's own
    bias input (None: none, or one added by a later node), ``bias_columns`` how much of its last
    axis is the bias of ``W x`` (0: all of it; a recurrent layer's ``B`` is ``[dirs, 2 G H]``,
    ``W``'s bias the first ``G H`` of each direction's row, the recurrence's the rest),
    ``patches`` whether an output position reads a window of kernel positions of the input (a
    Conv: im2col patch statistics apply) or, False, each kernel position's row of ``W`` reads one
    input position (a ConvTranspose spreads every input position over the kernel: statistics of
    the input's positions, one row per output channel and kernel position)."""

    outputs: int
    channel_axis: int
    kernel: tuple[int, ...] = ()
    bias: str | None = None
    bias_columns: int = 0
    patches: bool = True


class OpRule:
    """Base rule: declares nothing (a barrier) and rewrites nothing."""

    summary = "barrier"

    def couple(self, node: "Node", c: Coupler) -> None:
        raise Unsupported(f"no rule for {node.op_type}")

    def rewrite(self, node: "Node", r: Rewriter) -> None:
        return None

    def macs_axes(
        self, node: "Node", shape: Callable[[str], tuple[int, ...]]
    ) -> list[tuple[str, int]] | None:
        """Axes whose sizes give the node's multiply-accumulate count (None: no MACs)."""
        return None

    def input_weight(self, node: "Node", weight: str, axis: int, shape: tuple[int, ...]) -> WeightView | None:
        """How ``node`` reads its first input's channels through the constant ``weight`` (of
        ``shape``; ``axis`` the weight axis that reads them), or None when it is no plain linear
        map of them (the default)."""
        return None

    def macs_value(self, sizes: Sequence[float]) -> float:
        """The MAC count from the kept sizes of the :meth:`macs_axes` (their product)."""
        return math.prod(sizes)

    def added_bias(self, node: "Node", name: str) -> str | None:
        """The input that ``node`` adds along the last axis to its input ``name`` before anything
        else (an Add's other operand, a fused op's bias), which is then the bias of the layer
        producing ``name``; None (the default) when it adds none."""
        return None


@dataclass(frozen=True)
class _Entry:
    domain: str
    op_type: str
    min_opset: int
    max_opset: int
    rule: OpRule


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def register_op(
    *op_types: str, domain: str = "", opsets: tuple[int, int] = (1, 23)
) -> Callable[[type[OpRule]], type[OpRule]]:
    """Class decorator registering one rule instance for ``op_types`` in an opset range."""

    def decorate(cls: type[OpRule]) -> type[OpRule]:
        rule = cls()
        for op_type in op_types:
            _REGISTRY.setdefault((domain, op_type), []).insert(
                0, _Entry(domain, op_type, opsets[0], opsets[1], rule)
            )
        return cls

    return decorate


def _load_entry_points() -> None:
    load_entry_points("spa_prune.op_rules")


def get_rule(domain: str, op_type: str, opset: int) -> OpRule | None:
    """The rule for an op at an opset, or None (the op is then a barrier)."""
    _load_entry_points()
    domain = "" if domain == "ai.onnx" else domain
    for entry in _REGISTRY.get((domain, op_type), []):
        if entry.min_opset <= opset <= entry.max_opset:
            return entry.rule
    return None


def registered_ops() -> list[tuple[str, str, int, int, str]]:
    """``(domain, op_type, min_opset, max_opset, summary)`` for every registered rule."""
    _load_entry_points()
    rows = [
        (e.domain, e.op_type, e.min_opset, e.max_opset, e.rule.summary)
        for entries in _REGISTRY.values()
        for e in entries
    ]
    return sorted(rows)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def each_output(node: "Node") -> Iterable[str]:
    return (o for o in node.outputs if o)
