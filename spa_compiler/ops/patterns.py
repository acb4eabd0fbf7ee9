"""Graph patterns the reshape rules recognise around a split or merge of axes: attention
(a product of two activations: Q·Kᵀ, P·V), channel shuffles (split, Transpose, merge), grouped-query
repeats of key/value heads (an Expand from size 1), recurrent outputs (``[directions, hidden]``),
the axes a consumer slices, gathers or splits along, and which axis of a transposed tensor
carries the channels of the layer that wrote it or of the layers that read it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import int_param
from .registry import Coupler, Unsupported, normalize_axis

if TYPE_CHECKING:
    from ..ir import Node

__all__ = [
    "through_transposes", "selected_downstream", "followed_by_shuffle", "repeats_inner_axis",
    "comes_from_attention", "comes_from_recurrent", "feeds_attention", "channel_axis", "channel_axis_read",
]


def through_transposes(c: Coupler, name: str) -> list["Node"]:
    """The consumers of ``name``, looking through Transpose nodes."""
    found = []
    for node in c.consumers(name):
        if node.op_type == "Transpose":
            found += through_transposes(c, node.outputs[0])
        else:
            found.append(node)
    return found


def selected_downstream(c: Coupler, name: str, to_origin: list[int] | None = None) -> set[int]:
    """Axes of ``name`` that a consumer (looking through Transposes) slices, gathers or
    splits along."""
    rank = len(c.shape(name))
    to_origin = to_origin if to_origin is not None else list(range(rank))
    found: set[int] = set()
    for node in c.consumers(name):
        if node.op_type == "Transpose":
            perm = node.attr("perm") or list(reversed(range(rank)))
            found |= selected_downstream(c, node.outputs[0], [to_origin[p] for p in perm])
        elif node.op_type in ("Gather", "Split"):
            found.add(to_origin[normalize_axis(int(node.attr("axis", 0)), rank)])
        elif node.op_type == "Slice":
            try:
                axes = node.attr("axes") if c.opset < 10 else int_param(node, c, "axes", 3)
            except Unsupported:
                axes = None
            found |= {to_origin[normalize_axis(a, rank)] for a in (axes or range(rank))}
    return found


def followed_by_shuffle(c: Coupler, x: str, y: str) -> bool:
    """Whether the split of ``x`` into ``y`` is a channel shuffle: a Transpose follows it, and
    then only Reshapes or Flattens back to ``x``'s shape (DeBERTa's ``[B, T, H, D] ->
    [B, H, T, D] -> [B·H, T, D]`` is attention, not a shuffle)."""
    direct = c.consumers(y)
    return (
        len(direct) == 1 and direct[0].op_type == "Transpose"
        and all(n.op_type in ("Reshape", "Flatten") and c.shape(n.outputs[0]) == c.shape(x)
                for n in through_transposes(c, y))
    )


def repeats_inner_axis(c: Coupler, x: str, inner: int) -> bool:
    """Whether ``x`` is an Expand that broadcasts its axis ``inner`` from size 1: grouped-query
    attention repeating each key/value head for the query heads of its group
    (``[B, KV, 1, S, D] -> [B, KV, R, S, D]``, then merged into ``KV * R`` heads)."""
    node = c.producer(x)
    if node is None or node.op_type != "Expand":
        return False
    source = c.shape(node.inputs[0])
    k = inner - (len(c.shape(x)) - len(source))
    return k < 0 or source[k] == 1


def comes_from_attention(c: Coupler, name: str) -> bool:
    """Whether ``name`` is (through Transposes and Reshapes that keep the last axis, as the
    classic exporter writes around ``scaled_dot_product_attention`` and DeBERTa splits ``B·H``
    back into ``B, H``) the product of two activations (P·V)."""
    node = c.producer(name)
    while node is not None and (node.op_type == "Transpose" or _keeps_last_axis(c, node)):
        node = c.producer(node.inputs[0])
    return node is not None and node.op_type == "MatMul" and not any(c.is_constant(i) for i in node.inputs)


def _keeps_last_axis(c: Coupler, node: "Node") -> bool:
    """Whether ``node`` is a Reshape that regroups only the axes before the last: the last axis
    has the same size on both sides, so (the sizes being equal in total) it is a block of its own."""
    if node.op_type != "Reshape":
        return False
    a, b = c.shape(node.inputs[0]), c.shape(node.outputs[0])
    return bool(a) and bool(b) and a[-1] == b[-1]


def comes_from_recurrent(c: Coupler, name: str) -> bool:
    """Whether ``name`` is (through Transposes) a recurrent node's Y, whose hidden units are the
    innermost axis of a [directions, hidden] merge."""
    node = c.producer(name)
    while node is not None and node.op_type == "Transpose":
        node = c.producer(node.inputs[0])
    return node is not None and node.op_type in ("RNN", "GRU", "LSTM")


_ON_THE_WAY_TO_ATTENTION = ("Transpose", "Reshape", "Concat", "Slice", "Squeeze", "Unsqueeze", "Gather", "Split", "Mul", "Div")


def feeds_attention(c: Coupler, name: str, depth: int = 6) -> bool:
    """Whether the split tensor reaches a product of two activations (Q·Kᵀ, P·V) through a
    few data-movement or scaling ops (the dynamo exporter writes ``kᵀ`` as a Reshape to
    ``[B·H, T, D]``, a Transpose and a Reshape back); the split then makes heads, or head
    dimensions with ``--head-dims``."""
    for node in c.consumers(name):
        if node.op_type == "MatMul" and not any(c.is_constant(i) for i in node.inputs):
            return True
        if depth and node.op_type in _ON_THE_WAY_TO_ATTENTION:
            if any(feeds_attention(c, out, depth - 1) for out in node.outputs if out):
                return True
    return False


_CHANNELS_ON_AXIS_1 = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "BatchNormalization", "InstanceNormalization", "LRN",
})
_CHANNELS_ON_LAST_AXIS = frozenset({"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"})
_KEEPS_LAYOUT = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Mish", "Gelu", "Erf", "Identity", "Dropout", "Cast", "Neg", "Abs", "Add", "Sub", "Mul", "Div",
    "Pad", "QuantizeLinear", "DequantizeLinear", "Concat", "Max", "Min",
})


def channel_axis(c: Coupler, name: str) -> int | None:
    """The axis of ``name`` that holds the channels of the layer that wrote it, or None when
    that is not known. Looking up through Transposes (axis ``i`` of a Transpose's output is axis
    ``perm[i]`` of its input) and ops that keep the layout (activations, element-wise ops on a
    tensor of the same rank, Pad, Concat), to an op whose layout ONNX fixes: channels on axis 1
    (convolutions, pooling, BatchNorm), or on the last axis (MatMul, Gemm with a constant weight,
    rows gathered from an embedding table). A permute before a flatten (``[N, C, T] -> [N, T, C]
    -> [N, T*C]``) leaves the channels inside the merge. Whichever single axis a merge couples,
    its index map is exact: a wrong guess only leaves the channels a barrier."""
    rank = len(c.shape(name))
    origin = list(range(rank))
    node = c.producer(name)
    while node is not None and (node.op_type == "Transpose" or node.op_type in _KEEPS_LAYOUT):
        if node.op_type == "Transpose":
            perm = node.attr("perm") or list(reversed(range(rank)))
            origin = [perm[o] for o in origin]
        source = next((i for i in node.inputs if i and not c.is_constant(i)), None)
        if source is None or len(c.shape(source)) != rank:
            return None
        node = c.producer(source)
    if node is None:
        return None
    if node.op_type in _CHANNELS_ON_AXIS_1:
        channels = 1
    elif node.op_type in _CHANNELS_ON_LAST_AXIS and any(c.is_constant(i) for i in node.inputs[:2]):
        channels = rank - 1  # a layer's weight; a product of two activations (P·V) makes heads instead
    elif node.op_type == "Gather" and c.is_constant(node.inputs[0]) and len(c.shape(node.inputs[0])) == 2 \
            and normalize_axis(int(node.attr("axis", 0)), 2) == 0:
        channels = rank - 1  # rows of an embedding table
    else:
        return None
    return origin.index(channels) if channels in origin else None


def channel_axis_read(c: Coupler, name: str, depth: int = 8) -> int | None:
    """The axis of ``name`` that the layers reading it take for their input channels, or None
    when that is not known or its readers disagree: the mirror of :func:`channel_axis`, looking
    down through Transposes (a reader's axis ``j`` of a Transpose's output is axis ``perm[j]``
    of its input) and ops that keep the layout, to axis 1 of a convolution's, pooling's or
    BatchNorm's data, the last axis of a MatMul's with a constant weight, or a Gemm's. A
    channels-last split before a convolution (Keras' ``Dense -> Reshape((h, w, c))`` into
    NCHW) leaves the channels innermost."""
    rank = len(c.shape(name))
    found = {_axis_read_by(c, node, name, rank, depth) for node in c.consumers(name)}
    return found.pop() if len(found) == 1 else None


def _axis_read_by(c: Coupler, node: "Node", name: str, rank: int, depth: int) -> int | None:
    """The axis of ``name`` (rank ``rank``) that ``node``, one of its readers, takes for channels."""
    if node.op_type == "Transpose":
        perm = node.attr("perm") or list(reversed(range(rank)))
        read = channel_axis_read(c, node.outputs[0], depth - 1) if depth else None
        return perm[read] if read is not None else None
    if node.op_type in _KEEPS_LAYOUT:
        same_rank = len(c.shape(node.outputs[0])) == rank
        return channel_axis_read(c, node.outputs[0], depth - 1) if depth and same_rank else None
    if node.inputs[0] != name:
        return None
    if node.op_type in _CHANNELS_ON_AXIS_1:
        return 1
    if node.op_type == "MatMul" and c.is_constant(node.inputs[1]):
        return rank - 1
    if node.op_type == "Gemm" and c.is_constant(node.inputs[1]):
        return 0 if node.attr("transA", 0) else 1
    return None
