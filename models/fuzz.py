"""Fuzzing the op rules: random valid ONNX graphs, each pruned under an exactness oracle.

The generator builds graphs with ``onnx.helper`` (no PyTorch) from the patterns the op registry
knows: conv stacks with residual Adds, grouped and depthwise convs, Concat/Split/Slice/Gather
along channels, normalisations, activations, element-wise ops with per-channel and scalar
constants, Transposes, pooling, resizing and padding, squeeze-and-excitation gates, channel
shuffles, attention blocks (Reshape into heads, Transpose, MatMul, Softmax), Flatten into Gemm
(at times after a permute that puts the channels inside the merge), GroupNorm as PyTorch
exports it before opset 21 (Reshape, InstanceNormalization, Reshape),
``torch.chunk`` at Slice bounds computed at run time, and a few ops that must block (Softmax, LRN,
reductions over channels); slice assignments (``ScatterElements``, ``ScatterND``) in a block set
of their own (:data:`SCATTER_BLOCKS`, which ``tests/test_fuzz.py`` draws from). Every opset from 11 to 23
is drawn, and ops whose signature changed across opsets are written the way that opset wants
(Split sizes, Squeeze/Unsqueeze and Reduce axes as attributes or inputs, Resize's ``roi``, ...).
Every graph passes ``onnx.checker.check_model(full_check=True)`` before it is used.

The oracle (DESIGN invariant 3): channels are chosen at random among the prunable units of the
analysis, a criterion steers the plan to them, the weight slabs that read the planned channels
are zeroed (and, for channels a product of two activations contracts, the projections that write
them; see ``models.exactness``), and the model is pruned again. The pruned model must pass the
full checker, keep its graph inputs and outputs (names, element types, ranks), lose parameters,
run in onnxruntime (optimised, as the verification runs it) and reproduce the zeroed model's
outputs within 1e-4 relative (both run unoptimised: :mod:`models.exactness`); a graph that
amplifies rounding (outputs that nearly cancel, a normalisation over nearly constant values) within
ten times what its own outputs move when its inputs move by their rounding (at most 1e-2: a wrong
index map moves them by far more), and the outcome says so. Anything else
must be an honest refusal: every blocked unit names its reason, and a graph with nothing to
prune is refused with a :class:`~spa_compiler.SpaError`. A crash with any other exception, an
invalid model or different outputs is a failure.

    python -m models.fuzz --graphs 1000 [--seed S]      # graphs S .. S+999
    python -m models.fuzz --replay SEED [--save m.onnx]  # one graph, described, and its outcome
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.exactness import RTOL, prune_zeroed, relative_error, semantic_outputs, steering
from spa_compiler import (
    Analysis,
    PruneConfig,
    SpaError,
    VerificationError,
    analyze_graph,
    load_model,
    prune_graph,
)
from spa_compiler.verify import run_model

__all__ = [
    "Choices", "RandomChoices", "FuzzGraph", "generate_graph", "Outcome", "check_graph",
    "fuzz_seed", "blocked_category", "Summary", "run", "main", "OPSETS",
]

T = TypeVar("T")
OPSETS = (11, 23)
INT64_MAX = np.iinfo(np.int64).max
MAX_SIDE = 8  # upsampling blocks only run on feature maps at most this high and wide


# -- where the randomness comes from ---------------------------------------------------------

class Choices:
    """The decisions a graph is made of. Subclasses give ``integer``; everything else derives
    from it so that a shrinking engine (hypothesis) simplifies towards small integers: the first
    option of ``choice`` and ``False`` for ``chance``."""

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``, both included."""
        raise NotImplementedError

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self.integer(0, 999) >= round((1 - p) * 1000)

    def subset(self, n: int, k: int) -> list[int]:
        """``k`` distinct indices of ``range(n)``, in drawn order."""
        pool = list(range(n))
        return [pool.pop(self.integer(0, len(pool) - 1)) for _ in range(k)]


class RandomChoices(Choices):
    """Choices from a seeded :class:`random.Random`: one seed, one graph."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self.random.randint(low, high)


# -- building graphs -----------------------------------------------------------------------

@dataclass
class FuzzGraph:
    """A generated model, its opset and the blocks it was built from (in order)."""

    model: onnx.ModelProto
    opset: int
    blocks: list[str]

    def describe(self) -> str:
        return f"opset {self.opset}: " + " -> ".join(self.blocks)


class _Skip(Exception):
    """A block does not apply to the current tensor; another is drawn."""


class _Builder:
    """Nodes, constants and the shape and type of every tensor, written for one opset."""

    def __init__(self, opset: int, choices: Choices, rng: np.random.Generator) -> None:
        self.opset = opset
        self.choices = choices
        self.rng = rng
        self.constant_nodes = choices.chance(0.2)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, int] = {}
        self.trunks: list[str] = []
        self.log: list[str] = []
        self.count = 0
        self.pad_axes = False  # a Pad has an axes input: no Transpose may join (see node)

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    # constants
    def const(self, value: np.ndarray, prefix: str = "k") -> str:
        value = np.asarray(value)
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(value, name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("const"), value=tensor))
        else:
            self.initializers.append(tensor)
        self.shapes[name], self.dtypes[name] = value.shape, tensor.data_type
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "s")

    def floats(self, shape: Sequence[int], scale: float = 1.0, low: float | None = None) -> str:
        """Seeded normal values times ``scale``, or uniform in ``[low, low + scale)``."""
        if low is None:
            value = self.rng.standard_normal(tuple(shape)) * scale
        else:
            value = low + self.rng.random(tuple(shape)) * scale
        return self.const(value.astype(np.float32), "w")

    def weight(self, shape: Sequence[int], fan_in: int) -> str:
        return self.floats(shape, 1.0 / math.sqrt(max(fan_in, 1)))

    # nodes
    def node(self, op: str, inputs: Sequence[str], shapes: Sequence[tuple[int, ...]],
             dtypes: Sequence[int] | None = None, **attrs) -> list[str]:
        if op == "Transpose" and self.pad_axes:
            raise _Skip  # onnxruntime 1.32 cannot run a Transpose its optimiser pushes through such a Pad
        outputs = [self.fresh(op[:4].lower()) for _ in shapes]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=self.fresh("n"), **attrs))
        for k, (name, shape) in enumerate(zip(outputs, shapes)):
            self.shapes[name] = tuple(shape)
            self.dtypes[name] = dtypes[k] if dtypes else TensorProto.FLOAT
        return outputs

    def op(self, op: str, inputs: Sequence[str], shape: tuple[int, ...], **attrs) -> str:
        return self.node(op, inputs, [shape], **attrs)[0]

    # ops whose form depends on the opset
    def axes_param(self, inputs: list[str], axes: Sequence[int], input_from: int) -> tuple[list[str], dict]:
        """``axes`` as an attribute before opset ``input_from``, else as the next input."""
        if self.opset < input_from:
            return inputs, {"axes": list(axes)}
        return [*inputs, self.ints(axes)], {}

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        shape = list(self.shapes[x])
        for a in sorted(a % (len(shape) + len(axes)) for a in axes):
            shape.insert(a, 1)
        inputs, attrs = self.axes_param([x], axes, 13)
        return self.op("Unsqueeze", inputs, tuple(shape), **attrs)

    def squeeze(self, x: str, axes: Sequence[int] | None) -> str:
        """Squeeze ``axes``; ``None`` squeezes every size-1 axis with no ``axes`` parameter."""
        rank = len(self.shapes[x])
        gone = {a % rank for a in axes} if axes is not None else {k for k, d in enumerate(self.shapes[x]) if d == 1}
        shape = tuple(d for k, d in enumerate(self.shapes[x]) if k not in gone)
        if axes is None:
            return self.op("Squeeze", [x], shape)
        inputs, attrs = self.axes_param([x], axes, 13)
        return self.op("Squeeze", inputs, shape, **attrs)

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: bool) -> str:
        rank = len(self.shapes[x])
        gone = {a % rank for a in axes}
        shape = tuple(1 if k in gone else d for k, d in enumerate(self.shapes[x]) if keepdims or k not in gone)
        inputs, attrs = self.axes_param([x], axes, 13 if op == "ReduceSum" else 18)
        return self.op(op, inputs, shape, keepdims=int(keepdims), **attrs)

    def split(self, x: str, axis: int, sizes: list[int]) -> list[str]:
        """Split sizes as an attribute (before opset 13) or an input; or implied: equal parts,
        and from opset 18 ``num_outputs`` parts of ``ceil(size / num_outputs)``, the last smaller."""
        shape = list(self.shapes[x])
        outs = [tuple(shape[:axis % len(shape)] + [s] + shape[axis % len(shape) + 1:]) for s in sizes]
        chunk = -(-sum(sizes) // len(sizes))
        implied = sizes[:-1] == [chunk] * (len(sizes) - 1) and 0 < sizes[-1] <= chunk
        if implied and (len(set(sizes)) == 1 or self.opset >= 18) and self.choices.chance(0.5):
            attrs = {"num_outputs": len(sizes)} if self.opset >= 18 else {}
            return self.node("Split", [x], outs, axis=axis, **attrs)
        if self.opset < 13:
            return self.node("Split", [x], outs, axis=axis, split=sizes)
        return self.node("Split", [x, self.ints(sizes)], outs, axis=axis)

    def conv(self, x: str, co: int, k: int = 1, stride: int = 1, pad: int = 0, dilation: int = 1,
             group: int = 1, bias: bool = True) -> str:
        n, c, h, w = self.shapes[x]
        inputs = [x, self.weight((co, c // group, k, k), c // group * k * k)]
        if bias:
            inputs.append(self.floats((co,), 0.1))
        side = [(d + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for d in (h, w)]
        same = stride == dilation == 1 and 2 * pad == k - 1 and self.choices.chance(0.2)
        attrs = {"kernel_shape": [k, k], **({"auto_pad": "SAME_UPPER"} if same else {"pads": [pad] * 4})}
        if stride > 1:
            attrs["strides"] = [stride, stride]
        if dilation > 1:
            attrs["dilations"] = [dilation, dilation]
        if group > 1:
            attrs["group"] = group
        return self.op("Conv", inputs, (n, co, *side), **attrs)

    def linear(self, x: str, out: int) -> str:
        """``x @ W (+ b)`` over the last axis."""
        shape = self.shapes[x]
        y = self.op("MatMul", [x, self.weight((shape[-1], out), shape[-1])], (*shape[:-1], out))
        return self.op("Add", [y, self.floats((out,), 0.1)], self.shapes[y]) if self.choices.chance(0.6) else y

    def unary(self, op: str, x: str, **attrs) -> str:
        return self.op(op, [x], self.shapes[x], **attrs)

    def binary(self, op: str, a: str, b: str) -> str:
        shape = np.broadcast_shapes(self.shapes[a], self.shapes[b])
        return self.op(op, [a, b], tuple(shape))

    def reshape_target(self, x: str, shape: tuple[int, ...], runtime: dict[int, int] | None = None) -> str:
        """A target to reshape ``x`` to ``shape``: constant (``0`` copying the batch, one ``-1``
        at times) or, with ``runtime`` (output position -> axis of ``x`` of that size), computed
        at run time as PyTorch writes it (``Shape -> Gather -> Unsqueeze -> Concat``)."""
        values: list[int] = list(shape)
        if runtime and self.choices.chance(0.4):
            sizes = self.node("Shape", [x], [(len(self.shapes[x]),)], [TensorProto.INT64])[0]
            fixed = [k for k in range(len(shape)) if k not in runtime]
            if fixed and self.choices.chance(0.3):
                values[self.choices.choice(fixed)] = -1
            parts = []
            for k in range(len(shape)):
                if k not in runtime:
                    parts.append(self.ints([values[k]]))
                    continue
                dim = self.node("Gather", [sizes, self.const(np.asarray(runtime[k], np.int64), "i")], [()],
                                [TensorProto.INT64], axis=0)[0]
                inputs, attrs = self.axes_param([dim], [0], 13)
                parts.append(self.node("Unsqueeze", inputs, [(1,)], [TensorProto.INT64], **attrs)[0])
            return self.node("Concat", parts, [(len(shape),)], [TensorProto.INT64], axis=0)[0]
        if self.shapes[x][0] == shape[0] and self.choices.chance(0.3):
            values[0] = 0
        if self.choices.chance(0.3):
            values[self.choices.integer(0, len(values) - 1)] = -1
        return self.ints(values)

    def reshape(self, x: str, shape: tuple[int, ...], runtime: dict[int, int] | None = None,
                target: str | None = None) -> str:
        """Reshape ``x`` to ``shape`` with ``target``, or a new target (see ``reshape_target``)."""
        return self.op("Reshape", [x, target or self.reshape_target(x, shape, runtime)], shape)

    def model(self, inputs: list[str], outputs: list[str], value_info: bool, dynamic_batch: bool,
              initializers_as_inputs: bool) -> onnx.ModelProto:
        """The model; with ``dynamic_batch`` the inputs' first dimension is named ``N`` and
        every dimension of the outputs is named; ``initializers_as_inputs`` lists the weights
        among the graph inputs too (as older exporters did)."""
        batched = set(inputs) if dynamic_batch else set()

        def info(name: str, named: bool = False) -> onnx.ValueInfoProto:
            dims: list[int | str] = list(self.shapes[name])
            if named:
                dims = [f"{name}_{k}" for k in range(len(dims))]
            elif name in batched:
                dims[0] = "N"
            return helper.make_tensor_value_info(name, self.dtypes[name], dims)

        listed = set(inputs) | set(outputs) | {t.name for t in self.initializers}
        middle = [o for n in self.nodes if n.op_type != "Constant" for o in n.output if o not in listed]
        if initializers_as_inputs:
            inputs = [*inputs, *(t.name for t in self.initializers)]
        graph = helper.make_graph(
            self.nodes, "fuzz", [info(i) for i in inputs], [info(o, dynamic_batch) for o in outputs],
            self.initializers,
            value_info=[info(m) for m in middle] if value_info else None,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                                 producer_name="spa-prune fuzz")


# -- blocks: each takes the current [N, C, H, W] tensor and returns the next one -------------

def _dims(b: _Builder, x: str) -> tuple[int, int, int, int]:
    n, c, h, w = b.shapes[x]
    return n, c, h, w


def _divisors(n: int, low: int = 2) -> list[int]:
    return [d for d in range(low, n + 1) if n % d == 0]


def _conv(b: _Builder, x: str) -> str:
    _, _, h, w = _dims(b, x)
    co, k = b.choices.integer(2, 16), b.choices.choice([1, 3])
    stride = 2 if min(h, w) >= 4 and b.choices.chance(0.2) else 1
    dilation = 2 if k == 3 and min(h, w) >= 5 and b.choices.chance(0.2) else 1
    b.log.append(f"conv{k}x{k}->{co}" + f" s{stride}" * (stride > 1) + f" d{dilation}" * (dilation > 1))
    return b.conv(x, co, k, stride, dilation * (k - 1) // 2, dilation, bias=b.choices.chance(0.7))


def _grouped_conv(b: _Builder, x: str) -> str:
    _, c, _, _ = _dims(b, x)
    if c < 2:
        raise _Skip
    group = b.choices.choice(_divisors(c))
    co = group * b.choices.integer(1, max(1, 16 // group))
    k = b.choices.choice([3, 1])
    b.log.append(f"{'depthwise' if group == c else 'grouped'} conv g{group} {c}->{co}")
    return b.conv(x, co, k, pad=k // 2, group=group, bias=b.choices.chance(0.5))


def _conv_transpose(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    group = b.choices.choice([1, *_divisors(c)])
    co = group * b.choices.integer(1, max(1, 12 // group))
    upsample = max(h, w) <= MAX_SIDE and b.choices.chance(0.6)
    k, stride, pad = (2, 2, 0) if upsample else (3, 1, 1)
    inputs = [x, b.weight((c, co // group, k, k), c * k * k)]
    if b.choices.chance(0.5):
        inputs.append(b.floats((co,), 0.1))
    side = [(d - 1) * stride - 2 * pad + k for d in (h, w)]
    attrs = {"kernel_shape": [k, k], "strides": [stride, stride]}
    if upsample and b.choices.chance(0.4):
        attrs["output_shape"] = side
    else:
        attrs["pads"] = [pad] * 4
    if group > 1:
        attrs["group"] = group
    b.log.append(f"conv_transpose g{group} {c}->{co} s{stride}")
    return b.op("ConvTranspose", inputs, (n, co, *side), **attrs)


def _channels_last_linear(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    t = b.op("Transpose", [x], (n, h, w, c), perm=[0, 2, 3, 1])
    co = b.choices.integer(2, 16)
    y = b.linear(t, co)
    b.log.append(f"channels-last MatMul ->{co}")
    return b.op("Transpose", [y], (n, co, h, w), perm=[0, 3, 1, 2])


def _width_linear(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    if b.choices.chance(0.3):
        b.log.append("MatMul with a vector over the width")
        dot = b.op("MatMul", [x, b.weight((w,), w)], (n, c, h))
        return b.unsqueeze(dot, [-1])
    b.log.append("MatMul over the width")
    return b.linear(x, b.choices.integer(2, 8))


def _batchnorm(b: _Builder, x: str) -> str:
    _, c, _, _ = _dims(b, x)
    params = [b.floats((c,), 0.5, low=0.75), b.floats((c,), 0.1), b.floats((c,), 0.1), b.floats((c,), 1.0, low=0.5)]
    b.log.append("batchnorm")
    return b.op("BatchNormalization", [x, *params], b.shapes[x], epsilon=1e-3)


def _instancenorm(b: _Builder, x: str) -> str:
    _, c, h, w = _dims(b, x)
    if h * w < 4:
        raise _Skip
    b.log.append("instancenorm")
    return b.op("InstanceNormalization", [x, b.floats((c,), 0.5, low=0.75), b.floats((c,), 0.1)], b.shapes[x])


def _groupnorm(b: _Builder, x: str) -> str:
    """GroupNormalization from opset 21 (GroupNormalization-18 is deprecated: the onnx checker
    rejects it); before, as PyTorch exports ``nn.GroupNorm``: ``Reshape [0, G, -1] ->
    InstanceNormalization -> Reshape(Shape(x)) -> Mul -> Add``."""
    n, c, h, w = _dims(b, x)
    if c < 2 or h * w < 4:
        raise _Skip
    groups = b.choices.choice(_divisors(c, 1))
    if b.opset < 21:
        b.log.append(f"groupnorm g{groups} (decomposed)")
        grouped = b.reshape(x, (n, groups, c // groups * h * w), target=b.ints([0, groups, -1]))
        normed = b.op("InstanceNormalization", [grouped, b.floats((groups,), 0.0, low=1.0), b.floats((groups,), 0.0)],
                      b.shapes[grouped], epsilon=1e-3)
        sizes = b.node("Shape", [x], [(4,)], [TensorProto.INT64])[0]
        back = b.reshape(normed, (n, c, h, w), target=sizes)
        scaled = b.op("Mul", [back, b.floats((c, 1, 1), 0.5, low=0.75)], (n, c, h, w))
        return b.op("Add", [scaled, b.floats((c, 1, 1), 0.1)], (n, c, h, w))
    b.log.append(f"groupnorm g{groups}")
    return b.op("GroupNormalization", [x, b.floats((c,), 0.5, low=0.75), b.floats((c,), 0.1)], b.shapes[x],
                num_groups=groups, epsilon=1e-3)


def _layernorm(b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    if b.opset < 17:
        raise _Skip
    axis = b.choices.choice([-1, 2, 1])
    normalised = shape[axis:]
    if math.prod(normalised) < 4:
        raise _Skip
    inputs = [x, b.floats(normalised, 0.5, low=0.75)]
    if b.choices.chance(0.5):
        inputs.append(b.floats(normalised, 0.1))
    b.log.append(f"layernorm axis {axis}")
    return b.op("LayerNormalization", inputs, shape, axis=axis, epsilon=1e-3)


UNARY = [  # (op, first opset, attributes); smooth, bounded-growth functions only
    ("Relu", 1, {}), ("Sigmoid", 1, {}), ("Tanh", 1, {}), ("LeakyRelu", 1, {"alpha": 0.1}),
    ("HardSigmoid", 1, {"alpha": 0.3, "beta": 0.4}), ("HardSwish", 14, {}), ("Elu", 1, {"alpha": 0.7}),
    ("Selu", 1, {}), ("Celu", 12, {}), ("Softplus", 1, {}), ("Softsign", 1, {}), ("Gelu", 20, {}),
    ("Mish", 18, {}), ("Erf", 1, {}), ("Abs", 1, {}), ("Neg", 1, {}), ("Identity", 1, {}),
    ("Sin", 1, {}), ("Cos", 1, {}), ("Atan", 1, {}), ("Dropout", 1, {}), ("Clip", 1, {}), ("Cast", 1, {}),
]


def _unary(b: _Builder, x: str) -> str:
    op, _, attrs = b.choices.choice([u for u in UNARY if u[1] <= b.opset])
    b.log.append(op)
    if op == "Clip":
        low = b.const(np.float32(-0.5)) if b.choices.chance(0.7) else ""
        high = b.const(np.float32(0.7)) if b.choices.chance(0.7) else ""
        return b.op("Clip", [x, low, high] if high else [x, low], b.shapes[x])
    if op == "Cast":
        wide = b.node("Cast", [x], [b.shapes[x]], [TensorProto.DOUBLE], to=TensorProto.DOUBLE)[0]
        return b.op("Cast", [wide], b.shapes[x], to=TensorProto.FLOAT)
    if op == "Dropout" and b.choices.chance(0.4):
        return b.node("Dropout", [x], [b.shapes[x]] * 2, [TensorProto.FLOAT, TensorProto.BOOL])[0]
    return b.unary(op, x, **attrs)


def _bounded_power(b: _Builder, x: str) -> str:
    _, c, _, _ = _dims(b, x)
    t = b.unary("Tanh", x)
    if b.choices.chance(0.3):
        b.log.append("Exp(Tanh)")
        return b.unary("Exp", t)
    exponent = (np.float32(2.0) if b.choices.chance(0.5)
                else b.rng.integers(1, 4, (c, 1, 1)).astype(np.float32))
    b.log.append("Pow(Tanh)")
    return b.binary("Pow", t, b.const(exponent))


def _constant_shape(b: _Builder, x: str) -> tuple[int, ...]:
    n, c, h, w = _dims(b, x)
    return b.choices.choice([(c, 1, 1), (1, c, 1, 1), (), (1,), (w,), (h, 1), (c, h, w), (n, c, h, w), (1, 1, 1, 1)])


def _broadcast_constant(b: _Builder, x: str) -> str:
    op = b.choices.choice(["Add", "Mul", "Sub", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Where"])
    shape = _constant_shape(b, x)
    b.log.append(f"{op} with a constant of shape {list(shape)}")
    if op == "Div":
        return b.binary("Div", x, b.floats(shape, 1.5, low=0.5))
    if op == "PRelu":
        return b.binary("PRelu", x, b.floats(shape, 0.3))
    if op == "Where":
        condition = b.const(b.rng.random(shape) < 0.5, "m")
        operands = [x, b.floats(shape)]
        if b.choices.chance(0.5):
            operands.reverse()
        out = np.broadcast_shapes(b.shapes[x], shape)
        return b.op("Where", [condition, *operands], tuple(out))
    operands = [x, b.floats(shape)]
    if op in ("Sum", "Mean") and b.choices.chance(0.5):
        operands.append(b.floats(_constant_shape(b, x)))
    if b.choices.chance(0.4):
        operands.reverse()
    out = np.broadcast_shapes(*(b.shapes[o] for o in operands))
    return b.op(op, operands, tuple(out))


def _gate(b: _Builder, x: str) -> str:
    op = b.choices.choice(["Sigmoid", "HardSigmoid", "Tanh"])
    b.log.append(f"x * {op}(x)")
    return b.binary("Mul", x, b.unary(op, x))


def _residual(b: _Builder, x: str) -> str:
    _, c, _, _ = _dims(b, x)
    inner = b.conv(x, c, 3, pad=1, bias=b.choices.chance(0.5))
    if b.choices.chance(0.5):
        inner = _batchnorm(b, inner)
    inner = b.conv(b.unary("Relu", inner), c, bias=b.choices.chance(0.5))
    join = b.choices.choice(["Add", "Sum", "Sub"])
    b.log.append(f"residual {join}")
    return b.binary(join, *((x, inner) if b.choices.chance(0.5) else (inner, x)))


def _shared_weight(b: _Builder, x: str) -> str:
    """One convolution weight (and bias) used by two Conv nodes, joined by Add or Concat."""
    n, c, h, w = _dims(b, x)
    first = b.conv(x, b.choices.integer(2, 12), 3, pad=1)
    node = b.nodes[-1]
    second = b.op("Conv", [b.unary("Relu", x), *node.input[1:]], b.shapes[first],
                  **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    join = b.choices.choice(["Add", "Concat"])
    b.log.append(f"two convs sharing a weight -> {join}")
    if join == "Add":
        return b.binary("Add", first, second)
    return b.op("Concat", [first, second], (n, 2 * b.shapes[first][1], h, w), axis=1)


def _long_skip(b: _Builder, x: str) -> str:
    earlier = [t for t in b.trunks[:-1] if b.shapes[t] == b.shapes[x] and t != x]
    if not earlier:
        raise _Skip
    b.log.append("long skip Add")
    return b.binary("Add", x, b.choices.choice(earlier))


def _squeeze_excite(b: _Builder, x: str) -> str:
    n, c, _, _ = _dims(b, x)
    r = b.choices.integer(1, max(1, c))
    if b.choices.chance(0.25):
        b.log.append(f"squeeze-excite mean {c}->{r}->{c}")
        mean = b.reduce("ReduceMean", x, [-2, -1], keepdims=False)
        s = b.unsqueeze(b.linear(b.unary("Relu", b.linear(mean, r)), c), [2, 3])
        s = b.unary("Sigmoid", s)
        return b.binary("Mul", x, s)
    pooled = (b.op("GlobalAveragePool", [x], (n, c, 1, 1)) if b.choices.chance(0.5)
              else b.reduce("ReduceMean", x, [2, 3], keepdims=True))
    if b.choices.chance(0.5):
        b.log.append(f"squeeze-excite conv {c}->{r}->{c}")
        s = b.conv(b.unary("Relu", b.conv(pooled, r)), c)
    else:
        b.log.append(f"squeeze-excite gemm {c}->{r}->{c}")
        flat = b.op("Flatten", [pooled], (n, c)) if b.choices.chance(0.5) else b.squeeze(pooled, [2, 3])
        hidden = b.op("Gemm", [flat, b.weight((r, c), c), b.floats((r,), 0.1)], (n, r), transB=1)
        s = b.op("Gemm", [b.unary("Relu", hidden), b.weight((r, c), r)], (n, c))
        s = b.unsqueeze(s, [2, 3]) if b.choices.chance(0.5) else b.reshape(s, (n, c, 1, 1))
    s = b.unary(b.choices.choice(["Sigmoid", "HardSigmoid"]), s)
    return b.binary("Mul", *((x, s) if b.choices.chance(0.5) else (s, x)))


def _branch(b: _Builder, x: str) -> str:
    """One branch of a multi-branch block, keeping the spatial size."""
    kind = b.choices.choice(["identity", "conv", "unary", "pool"])
    if kind == "conv":
        return b.conv(x, b.choices.integer(1, 12), 3, pad=1)
    if kind == "unary":
        return b.unary("Relu", x)
    if kind == "pool":
        return b.op("MaxPool", [x], b.shapes[x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return x


def _concat(b: _Builder, x: str) -> str:
    branches = [_branch(b, x) for _ in range(b.choices.integer(2, 3))]
    n, _, h, w = _dims(b, x)
    c = sum(b.shapes[t][1] for t in branches)
    axis = b.choices.choice([1, -3])
    b.log.append(f"concat of {len(branches)} branches ->{c}")
    return b.op("Concat", branches, (n, c, h, w), axis=axis)


def _split(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    if c < 2:
        raise _Skip
    parts = b.choices.integer(2, min(4, c))
    chunk = -(-c // parts)
    if b.choices.chance(0.3) and chunk * (parts - 1) < c:
        sizes = [chunk] * (parts - 1) + [c - chunk * (parts - 1)]
    else:
        cuts = sorted(b.choices.subset(c - 1, parts - 1))
        sizes = [e - s for s, e in zip([0, *(k + 1 for k in cuts)], [*(k + 1 for k in cuts), c])]
    pieces = [_branch(b, p) for p in b.split(x, b.choices.choice([1, -3]), sizes)]
    widths = [b.shapes[p][1] for p in pieces]
    if len(set(widths)) == 1 and b.choices.chance(0.3):
        b.log.append(f"split {sizes} -> Sum")
        return b.op("Sum", pieces, b.shapes[pieces[0]])
    keep = b.choices.subset(len(pieces), b.choices.integer(max(1, len(pieces) - 1), len(pieces)))
    kept = [pieces[k] for k in keep]
    b.log.append(f"split {sizes} -> concat of parts {keep}")
    return b.op("Concat", kept, (n, sum(b.shapes[p][1] for p in kept), h, w), axis=1)


def _slice(b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    axis = b.choices.choice([1, 1, 2, 3])
    dim = shape[axis]
    if dim < 2:
        raise _Skip
    step = b.choices.choice([1, 1, 1, 2, -1])
    start = b.choices.integer(0, dim - 1)
    end = b.choices.integer(start + 1, dim)
    if step == -1:
        start, end = end - 1, (start - 1 if start else -dim - 1)
    length = len(range(*slice(start, end, step).indices(dim)))
    if step == 1 and end == dim:
        end = b.choices.choice([dim, INT64_MAX, dim + 3])
    elif step == 1 and b.choices.chance(0.3):
        end -= dim
    if b.choices.chance(0.3):
        start -= dim
    out = tuple(length if k == axis else d for k, d in enumerate(shape))
    form = b.choices.integer(0, 2)  # axes given, negative axes given, axes omitted
    if form == 2:
        starts, ends = [0] * axis + [start], [INT64_MAX] * axis + [end]
        inputs = [x, b.ints(starts), b.ints(ends)]
    else:
        given = axis - len(shape) if form == 1 else axis
        inputs = [x, b.ints([start]), b.ints([end]), b.ints([given])]
        if step != 1 or b.choices.chance(0.3):
            inputs.append(b.ints([step]))
    if form == 2 and step != 1:
        inputs += ["", b.ints([1] * axis + [step])]
    b.log.append(f"slice axis {axis} [{start}:{end}:{step}]")
    return b.op("Slice", inputs, out)


def _gather(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    if b.choices.chance(0.15):
        b.log.append("gather one channel (scalar index)")
        picked = b.node("Gather", [x, b.const(np.asarray(b.choices.integer(0, c - 1), np.int64), "i")],
                        [(n, h, w)], axis=1)[0]
        return b.unsqueeze(picked, [1])
    indices = b.choices.subset(c, b.choices.integer(1, c))
    if b.choices.chance(0.2):
        indices.append(indices[0])
    if b.choices.chance(0.3):
        indices = [i - c for i in indices]
    b.log.append(f"gather channels {indices}")
    return b.node("Gather", [x, b.ints(indices)], [(n, len(indices), h, w)], axis=1)[0]


def _channel_shuffle(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    groups = [g for g in _divisors(c) if g < c]
    if not groups:
        raise _Skip
    g = b.choices.choice(groups)
    b.log.append(f"channel shuffle g{g}")
    split = b.reshape(x, (n, g, c // g, h, w), runtime={0: 0, 3: 2, 4: 3})
    shuffled = b.op("Transpose", [split], (n, c // g, g, h, w), perm=[0, 2, 1, 3, 4])
    return b.reshape(shuffled, (n, c, h, w), runtime={0: 0, 2: 3, 3: 4})


def _integer(b: _Builder, op: str, inputs: Sequence[str], shape: tuple[int, ...] = ()) -> str:
    return b.node(op, inputs, [shape], [TensorProto.INT64], **({"axis": 0} if op in ("Gather", "Concat") else {}))[0]


def _as_bound(b: _Builder, scalar: str) -> str:
    inputs, attrs = b.axes_param([scalar], [0], 13)
    return b.node("Unsqueeze", inputs, [(1,)], [TensorProto.INT64], **attrs)[0]


def _run_time_chunk(b: _Builder, x: str) -> str:
    """``torch.chunk(2)`` of channels an export hid behind ``view(n, -1, h, w)``: the Slice bounds
    are computed at run time (``Shape -> Gather -> Add -> Div -> Mul``; they stay so when the batch
    is named, and fold into constants otherwise); the second half goes through a branch and the
    halves are joined again. At times the last k channels instead (``c - k``: no chunk, blocked)."""
    n, c, h, w = _dims(b, x)
    if c < 2 or c % 2:
        raise _Skip
    sizes = b.node("Shape", [x], [(4,)], [TensorProto.INT64])[0]
    entries = [_as_bound(b, _integer(b, "Gather", [sizes, b.const(np.asarray(k, np.int64), "i")])) for k in (0, 2, 3)]
    target = _integer(b, "Concat", [entries[0], b.ints([-1]), *entries[1:]], (4,))
    hidden = b.reshape(x, (n, c, h, w), target=target)
    count = _integer(b, "Gather", [b.node("Shape", [hidden], [(4,)], [TensorProto.INT64])[0],
                                   b.const(np.asarray(1, np.int64), "i")])
    axes = b.ints([1])
    if b.choices.chance(0.2):
        last = b.choices.integer(1, c - 1)
        start = _as_bound(b, _integer(b, "Sub", [count, b.const(np.asarray(last, np.int64), "i")]))
        b.log.append(f"last {last} channels at run-time bounds")
        return b.op("Slice", [hidden, start, b.ints([INT64_MAX]), axes], (n, last, h, w))
    one, two = b.const(np.asarray(1, np.int64), "i"), b.const(np.asarray(2, np.int64), "i")
    half = _integer(b, "Div", [_integer(b, "Add", [count, one]), two])
    middle, end = _as_bound(b, _integer(b, "Mul", [half, one])), _as_bound(b, _integer(b, "Mul", [half, two]))
    first = b.op("Slice", [hidden, b.ints([0]), middle, axes], (n, c // 2, h, w))
    second = _branch(b, b.op("Slice", [hidden, middle, end, axes], (n, c // 2, h, w)))
    b.log.append("chunk(2) at run-time bounds")
    return b.op("Concat", [first, second], (n, c // 2 + b.shapes[second][1], h, w), axis=1)


def _concat_earlier(b: _Builder, x: str) -> str:
    n, _, h, w = _dims(b, x)
    earlier = [t for t in b.trunks[:-1] if t != x and (b.shapes[t][0], *b.shapes[t][2:]) == (n, h, w)]
    if not earlier:
        raise _Skip
    other = b.choices.choice(earlier)
    parts = [x, other] if b.choices.chance(0.5) else [other, x]
    b.log.append("concat with an earlier tensor")
    return b.op("Concat", parts, (n, sum(b.shapes[p][1] for p in parts), h, w), axis=1)


def _spatial_join(b: _Builder, x: str) -> str:
    """Two convolutions of one width stacked along the height (their channels are coupled one
    to one), or the height split, the parts treated apart and concatenated back."""
    n, c, h, w = _dims(b, x)
    axis = b.choices.choice([2, 3, -1])
    if b.choices.chance(0.5):
        co = b.choices.integer(2, 12)
        parts = [b.conv(x, co, 3, pad=1), b.conv(x, co, 1)]
        b.log.append(f"two convs ->{co} concatenated along axis {axis}")
    else:
        side = b.shapes[x][axis]
        if side < 2:
            raise _Skip
        first = b.choices.integer(1, side - 1)
        top, bottom = b.split(x, axis, [first, side - first])
        parts = [b.unary("Relu", top), b.binary("Mul", bottom, b.floats((c, 1, 1)))]
        b.log.append(f"split along axis {axis}, concatenated back")
    shape = list(b.shapes[parts[0]])
    shape[axis] = sum(b.shapes[p][axis] for p in parts)
    return b.op("Concat", parts, tuple(shape), axis=axis)


def _channels_last_layout(b: _Builder, x: str) -> str:
    """Concat or Split along the last axis of the NHWC layout, between two Transposes."""
    n, c, h, w = _dims(b, x)
    t = b.op("Transpose", [x], (n, h, w, c), perm=[0, 2, 3, 1])
    axis = b.choices.choice([-1, 3])
    if c >= 2 and b.choices.chance(0.5):
        first = b.choices.integer(1, c - 1)
        left, right = b.split(t, axis, [first, c - first])
        parts = [b.linear(left, b.choices.integer(1, 8)), right]
        b.log.append(f"NHWC split [{first}, {c - first}] and concat")
    else:
        parts = [t, b.linear(t, b.choices.integer(1, 8))]
        b.log.append("NHWC concat")
    co = sum(b.shapes[p][-1] for p in parts)
    joined = b.op("Concat", parts, (n, h, w, co), axis=axis)
    return b.op("Transpose", [joined], (n, co, h, w), perm=[0, 3, 1, 2])


def _spatial_gemm(b: _Builder, x: str) -> str:
    """Flatten from axis 2 (channels join the batch as Gemm rows), Gemm over the positions,
    and back to four axes."""
    n, c, h, w = _dims(b, x)
    k = b.choices.integer(1, 8)
    rows = b.op("Flatten", [x], (n * c, h * w), axis=2)
    y = b.op("Gemm", [rows, b.weight((h * w, k), h * w), b.floats((k,), 0.1)], (n * c, k))
    b.log.append(f"flatten(axis 2) -> Gemm over positions ->{k}")
    return b.reshape(y, (n, c, k, 1))


def _height_linear(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    ho = b.choices.integer(1, 8)
    b.log.append(f"W @ x over the height ->{ho}")
    return b.op("MatMul", [b.weight((ho, h), h), x], (n, c, ho, w))


def _conv1d(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    co, k = b.choices.integer(1, 12), b.choices.choice([1, 3])
    line = b.reshape(x, (n, c, h * w))
    inputs = [line, b.weight((co, c, k), c * k), b.floats((co,), 0.1)]
    y = b.op("Conv", inputs, (n, co, h * w), kernel_shape=[k], pads=[k // 2] * 2)
    b.log.append(f"conv1d over positions ->{co}")
    return b.reshape(y, (n, co, h, w))


def _transpose_round_trip(b: _Builder, x: str) -> str:
    """Transpose (at times moving the batch axis too), an op on the new last axis (a bias, an
    activation, or a MatMul that resizes it), and the inverse Transpose."""
    shape = b.shapes[x]
    perm = b.choices.subset(4, 4) if b.choices.chance(0.3) else [0, *(1 + k for k in b.choices.subset(3, 3))]
    moved = b.op("Transpose", [x], tuple(shape[p] for p in perm), perm=perm)
    last = b.shapes[moved][-1]
    inner = b.choices.choice(["Relu", "Add", "MatMul"])
    if inner == "MatMul":
        changed = b.linear(moved, b.choices.integer(1, 6))
    elif inner == "Add":
        changed = b.binary("Add", moved, b.floats((last,), 0.1))
    else:
        changed = b.unary("Relu", moved)
    inverse = [perm.index(k) for k in range(4)]
    b.log.append(f"transpose {perm}, {inner} and back")
    return b.op("Transpose", [changed], tuple(b.shapes[changed][p] for p in inverse), perm=inverse)


def _pool(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    op = b.choices.choice(["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"])
    b.log.append(op)
    if op.startswith("Global"):
        return b.op(op, [x], (n, c, 1, 1))
    attrs = {"p": 2} if op == "LpPool" else {}
    if min(h, w) >= 2 and b.choices.chance(0.6):
        return b.op(op, [x], (n, c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2], **attrs)
    if op == "AveragePool" and b.choices.chance(0.5):
        attrs["count_include_pad"] = 1
    return b.op(op, [x], (n, c, h, w), kernel_shape=[3, 3], pads=[1, 1, 1, 1], **attrs)


def _resize(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    if max(h, w) > MAX_SIDE:
        raise _Skip
    out = (n, c, 2 * h, 2 * w)
    mode = b.choices.choice(["nearest", "linear"])
    empty = b.const(np.zeros(0, np.float32)) if b.opset < 13 else ""
    if b.choices.chance(0.5):
        channels = 1.0
        if mode == "nearest" and b.choices.chance(0.3):
            channels = 1 + 0.9 / c  # keeps c channels, resampled: the last reads the one before
        b.log.append(f"resize x2 {mode} (scales)" + f", channels by {channels:.3g}" * (channels != 1))
        scales = np.asarray([1, channels, 2, 2], np.float32)
        return b.op("Resize", [x, empty, b.const(scales)], out, mode=mode)
    if b.opset >= 18 and b.choices.chance(0.5):
        b.log.append(f"resize x2 {mode} (sizes of axes 2, 3)")
        return b.op("Resize", [x, "", "", b.ints([2 * h, 2 * w])], out, mode=mode, axes=[2, 3])
    b.log.append(f"resize x2 {mode} (sizes)")
    scales = b.const(np.zeros(0, np.float32)) if b.opset < 13 else ""
    return b.op("Resize", [x, empty, scales, b.ints(out)], out, mode=mode)


def _pad(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    mode = b.choices.choice(["constant", "reflect", "edge"])
    limit = 1 if mode == "reflect" and min(h, w) < 3 else 2
    if mode == "reflect" and min(h, w) < 2:
        raise _Skip
    top, left, bottom, right = (b.choices.integer(0, limit) for _ in range(4))
    if mode == "constant" and min(h, w) > 2 and b.choices.chance(0.2):
        top, right = -1, -1  # negative pads crop
    front, back = (0, 0)
    if mode == "constant" and b.choices.chance(0.3):
        front, back = b.choices.integer(-1 if c > 2 else 0, 2), b.choices.integer(0, 2)
    out = (n, c + front + back, h + top + bottom, w + left + right)
    transposes = any(node.op_type == "Transpose" for node in b.nodes)
    if b.opset >= 18 and not (front or back or transposes) and b.choices.chance(0.5):
        inputs = [x, b.ints([top, left, bottom, right]), "", b.ints([2, 3])]
        b.pad_axes = True
    else:
        inputs = [x, b.ints([0, front, top, left, 0, back, bottom, right])]
    if mode == "constant" and b.choices.chance(0.4):
        inputs[2:3] = [b.const(np.float32(0.5))]
    b.log.append(f"pad {mode}" + (f" channels +{front}/+{back}" if front or back else ""))
    return b.op("Pad", inputs, out, mode=mode)


def _center(b: _Builder, x: str) -> str:
    op = b.choices.choice(["ReduceMean", "ReduceMax", "ReduceL2", "ReduceSum"])
    axes = b.choices.choice([[2, 3], [-1], [2], [1]])
    # half the mean (a sum over n values times 1 / 2n): a mean of the result is no rounding noise
    count = math.prod(b.shapes[x][a] for a in axes) if op == "ReduceSum" else 1
    b.log.append(f"x - {op}(x, axes {axes}) / {2 * count}")
    half = b.binary("Mul", b.reduce(op, x, axes, keepdims=True), b.const(np.float32(0.5 / count)))
    return b.binary("Sub", x, half)


def _depth_to_space(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    if c % 4 == 0 and max(h, w) <= MAX_SIDE and b.choices.chance(0.5):
        mode = b.choices.choice(["DCR", "CRD"])
        b.log.append(f"depth to space {mode}")
        return b.op("DepthToSpace", [x], (n, c // 4, 2 * h, 2 * w), blocksize=2, mode=mode)
    if h % 2 or w % 2:
        raise _Skip
    b.log.append("space to depth")
    return b.op("SpaceToDepth", [x], (n, 4 * c, h // 2, w // 2), blocksize=2)


def _attention(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    length = h * w
    heads, dim = b.choices.integer(1, 4), b.choices.integer(1, 4)
    hidden = heads * dim
    sequence = b.op("Transpose", [b.reshape(x, (n, c, length))], (n, length, c), perm=[0, 2, 1])
    by_sequence = {0: 0, 1: 1}
    form = b.choices.choice(["separate", "fused", "fused into [3, heads, dim]"])
    shared = None
    if form == "fused into [3, heads, dim]":
        qkv = b.reshape(b.linear(sequence, 3 * hidden), (n, length, 3, heads, dim), by_sequence)
        stacked = b.op("Transpose", [qkv], (3, n, heads, length, dim), perm=[2, 0, 3, 1, 4])
        qh, k, vh = _unstack(b, stacked)
        kh = b.op("Transpose", [k], (n, heads, dim, length), perm=[0, 1, 3, 2])
    else:
        if form == "fused":
            q, k, v = b.split(b.linear(sequence, 3 * hidden), -1, [hidden] * 3)
        else:
            q, k, v = (b.linear(sequence, hidden) for _ in range(3))
        if b.choices.chance(0.4):
            shared = b.reshape_target(q, (n, length, heads, dim), by_sequence)

        def split_heads(t: str, perm: list[int]) -> str:
            t4 = b.reshape(t, (n, length, heads, dim), by_sequence, shared)
            out = tuple(b.shapes[t4][p] for p in perm)
            return b.op("Transpose", [t4], out, perm=perm)

        qh, kh, vh = split_heads(q, [0, 2, 1, 3]), split_heads(k, [0, 2, 3, 1]), split_heads(v, [0, 2, 1, 3])
    scores = b.op("MatMul", [qh, kh], (n, heads, length, length))
    if b.choices.chance(0.5):
        scores = b.binary("Mul", scores, b.const(np.float32(1 / math.sqrt(dim))))
    else:
        scores = b.binary("Div", scores, b.const(np.asarray([math.sqrt(dim)], np.float32)))
    probs = b.op("Softmax", [scores], b.shapes[scores], axis=-1 if b.opset >= 13 else 3)
    context = b.op("MatMul", [probs, vh], (n, heads, length, dim))
    merged = b.reshape(b.op("Transpose", [context], (n, length, heads, dim), perm=[0, 2, 1, 3]),
                       (n, length, hidden), by_sequence)
    y = b.op("Transpose", [b.linear(merged, c)], (n, c, length), perm=[0, 2, 1])
    y = b.reshape(y, (n, c, h, w))
    b.log.append(f"attention ({form}) {heads}x{dim}" + " (one head-split target)" * bool(shared))
    return b.binary("Add", x, y) if b.choices.chance(0.6) else y


def _unstack(b: _Builder, stacked: str) -> list[str]:
    """The three parts of a ``[3, ...]`` tensor, by Gather of a scalar index, by Split or by
    Slice then Squeeze of the leading axis."""
    part = b.shapes[stacked][1:]
    how = b.choices.choice(["gather", "split", "slice"])
    if how == "gather":
        return [b.op("Gather", [stacked, b.const(np.asarray(i, np.int64), "i")], part, axis=0) for i in range(3)]
    if how == "split":
        pieces = b.split(stacked, 0, [1, 1, 1])
    else:
        pieces = [b.op("Slice", [stacked, b.ints([i]), b.ints([i + 1]), b.ints([0])], (1, *part)) for i in range(3)]
    return [b.squeeze(p, [0]) for p in pieces]


def _barrier(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    op = b.choices.choice(["Softmax", "LRN", "ReduceSum", "Tile"])
    b.log.append(f"{op} over channels")
    if op == "Softmax":
        return b.unary("Softmax", x, axis=1)
    if op == "LRN":
        return b.unary("LRN", x, size=3)
    if op == "ReduceSum":
        return b.binary("Add", x, b.reduce("ReduceSum", x, [1], keepdims=True))
    return b.op("Tile", [x, b.ints([1, 2, 1, 1])], (n, 2 * c, h, w))


def _expand(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    pooled = b.op("GlobalAveragePool", [x], (n, c, 1, 1))
    target = b.choices.choice([[n, c, h, w], [1, 1, h, w], [h, w], [c, 1, 1]])
    b.log.append(f"expand to {target}")
    wide = b.op("Expand", [pooled, b.ints(target)], tuple(np.broadcast_shapes((n, c, 1, 1), tuple(target))))
    return b.binary("Add", x, wide)


def _squeeze_round_trip(b: _Builder, x: str) -> str:
    axis = b.choices.integer(0, 4) - (5 if b.choices.chance(0.3) else 0)
    wide = b.unary("Relu", b.unsqueeze(x, [axis]))
    implicit = all(d > 1 for d in b.shapes[x]) and b.choices.chance(0.5)
    b.log.append(f"unsqueeze {axis} and squeeze" + (" (implicit axes)" if implicit else ""))
    return b.squeeze(wide, None if implicit else [axis])


def _scatter(b: _Builder, x: str) -> str:
    """``x[rows] = f(x[rows])`` along the height, the width or the channels, as exports write a
    slice assignment: ``ScatterElements`` with an index grid of the updates' shape, or
    ``ScatterND`` on that axis moved to the front; a reduction where the opset has one. Along
    the channels the indices address the pruned axis: those channels must stay."""
    shape = b.shapes[x]
    axis = b.choices.choice([1, 2, 3])
    rows = b.choices.subset(shape[axis], b.choices.integer(1, shape[axis]))
    picked_shape = tuple(len(rows) if k == axis else d for k, d in enumerate(shape))
    picked = b.node("Gather", [x, b.ints(rows)], [picked_shape], axis=axis)[0]
    updates = b.binary("Mul", picked, b.floats((1,), 1.0, low=0.5))
    reductions = ["none"] + ["add", "mul"] * (b.opset >= 16) + ["max", "min"] * (b.opset >= 18)
    reduction = b.choices.choice(reductions)
    attrs = {"reduction": reduction} if reduction != "none" else {}
    if b.choices.chance(0.5):
        b.log.append(f"scatter elements axis {axis} rows {rows} ({reduction})")
        grid = np.broadcast_to(np.asarray(rows).reshape([-1 if k == axis else 1 for k in range(4)]), picked_shape)
        return b.op("ScatterElements", [x, b.const(grid.astype(np.int64), "i"), updates], shape, axis=axis, **attrs)
    b.log.append(f"scatter nd axis {axis} rows {rows} ({reduction})")
    perm = [axis, *(k for k in range(4) if k != axis)]
    front = b.op("Transpose", [x], tuple(shape[k] for k in perm), perm=perm)
    moved = b.op("Transpose", [updates], tuple(picked_shape[k] for k in perm), perm=perm)
    indices = b.const(np.asarray(rows, np.int64).reshape(-1, 1), "i")
    written = b.op("ScatterND", [front, indices, moved], b.shapes[front], **attrs)
    return b.op("Transpose", [written], shape, perm=[int(k) for k in np.argsort(perm)])


SCATTER_BLOCKS: dict[str, Callable[[_Builder, str], str]] = {
    "conv": _conv, "residual": _residual, "scatter": _scatter,
}
"""Blocks of the scatter property test (``tests/test_fuzz.py``); kept apart from :data:`BLOCKS`
so that a seed of ``python -m models.fuzz`` keeps drawing the graph it drew."""

BLOCKS: dict[str, Callable[[_Builder, str], str]] = {
    "conv": _conv, "grouped_conv": _grouped_conv, "conv_transpose": _conv_transpose,
    "channels_last_linear": _channels_last_linear, "width_linear": _width_linear,
    "batchnorm": _batchnorm, "instancenorm": _instancenorm, "groupnorm": _groupnorm, "layernorm": _layernorm,
    "unary": _unary, "bounded_power": _bounded_power, "broadcast_constant": _broadcast_constant, "gate": _gate,
    "residual": _residual, "long_skip": _long_skip, "shared_weight": _shared_weight,
    "squeeze_excite": _squeeze_excite, "concat": _concat,
    "split": _split, "slice": _slice, "gather": _gather, "channel_shuffle": _channel_shuffle,
    "transpose": _transpose_round_trip, "pool": _pool, "resize": _resize, "pad": _pad, "center": _center,
    "depth_to_space": _depth_to_space, "attention": _attention, "barrier": _barrier, "expand": _expand,
    "squeeze": _squeeze_round_trip, "concat_earlier": _concat_earlier, "channels_last_layout": _channels_last_layout,
    "spatial_gemm": _spatial_gemm, "spatial_join": _spatial_join, "height_linear": _height_linear, "conv1d": _conv1d,
    "run_time_chunk": _run_time_chunk,
}


# -- heads: the last layers, ending in a graph output ----------------------------------------

def _head_conv(b: _Builder, x: str) -> str:
    b.log.append("conv head")
    return b.conv(x, b.choices.integer(1, 6))


def _head_gemm(b: _Builder, x: str) -> str:
    n, c, h, w = _dims(b, x)
    pre = b.choices.choice(["flatten", "gap", "reduce"])
    if pre == "reduce":
        flat = b.reduce("ReduceMean", x, [2, 3], keepdims=False)
    elif pre == "gap":
        pooled = b.op("GlobalAveragePool", [x], (n, c, 1, 1))
        flat = b.squeeze(pooled, [2, 3]) if b.choices.chance(0.5) else b.op("Flatten", [pooled], (n, c))
    else:
        if b.choices.chance(0.3):  # the channels inside the merge: Keras' channels-last Flatten, permute-then-reshape
            perm = b.choices.choice([[0, 2, 3, 1], [0, 2, 1, 3]])
            x = b.op("Transpose", [x], tuple(b.shapes[x][p] for p in perm), perm=perm)
            pre = f"permute {perm} and flatten"
        flat = (b.op("Flatten", [x], (n, c * h * w)) if b.choices.chance(0.7)
                else b.reshape(x, (n, c * h * w)))
    features, k = b.shapes[flat][1], b.choices.integer(1, 10)
    attrs = {"alpha": 0.5} if b.choices.chance(0.3) else {}
    if b.choices.chance(0.2):
        b.log.append(f"{pre} -> Gemm(W, xT) ->{k}")
        flat_t = b.op("Transpose", [flat], (features, n), perm=[1, 0])
        return b.op("Gemm", [b.weight((k, features), features), flat_t], (k, n), **attrs)
    trans_b = b.choices.chance(0.5)
    weight = b.weight((k, features) if trans_b else (features, k), features)
    inputs = [flat, weight]
    bias = b.choices.choice([(k,), (1, k), (), None])
    if bias is not None:
        inputs.append(b.floats(bias, 0.1))
        attrs["beta"] = 1.0
    if b.choices.chance(0.2):
        inputs[0] = b.op("Transpose", [flat], (features, n), perm=[1, 0])
        attrs["transA"] = 1
    b.log.append(f"{pre} -> Gemm ->{k}")
    return b.op("Gemm", inputs, (n, k), transB=int(trans_b), **attrs)


def _head_matmul(b: _Builder, x: str) -> str:
    b.log.append("mean -> MatMul head")
    return b.linear(b.reduce("ReduceMean", x, [2, 3], keepdims=False), b.choices.integer(1, 10))


def _head_identity(b: _Builder, x: str) -> str:
    b.log.append("output")
    return x


HEADS = [_head_conv, _head_gemm, _head_matmul, _head_identity]


def _attempt(b: _Builder, block: Callable[[_Builder, str], str], x: str) -> str | None:
    """Apply ``block`` to ``x``; when it does not apply, undo what it added and return None."""
    mark = (len(b.nodes), len(b.initializers), len(b.log))
    try:
        return block(b, x)
    except _Skip:
        del b.nodes[mark[0]:], b.initializers[mark[1]:], b.log[mark[2]:]
        return None


def generate_graph(choices: Choices, blocks: dict[str, Callable[[_Builder, str], str]] | None = None) -> FuzzGraph:
    """A random valid model: an input, a stem conv, 1 to 9 of ``blocks`` (default :data:`BLOCKS`)
    and a head (sometimes an intermediate tensor is a second output; sometimes the batch size is
    a named dimension)."""
    blocks = BLOCKS if blocks is None else blocks
    opset = choices.integer(*OPSETS)
    b = _Builder(opset, choices, np.random.default_rng(choices.integer(0, 2**32 - 1)))
    n, c, h, w = choices.integer(1, 2), choices.integer(1, 4), choices.integer(3, 10), choices.integer(3, 10)
    b.shapes["x"], b.dtypes["x"] = (n, c, h, w), TensorProto.FLOAT
    x = b.conv("x", choices.integer(2, 16), 3, pad=1) if choices.chance(0.9) else "x"
    b.log.append(f"input {[n, c, h, w]}" + (f" -> stem conv ->{b.shapes[x][1]}" if x != "x" else ""))
    b.trunks.append(x)
    names = list(blocks)
    wanted = choices.integer(1, 9)
    while len(b.trunks) <= wanted:
        y = _attempt(b, blocks[choices.choice(names)], x)
        if y is not None:
            x = y
            b.trunks.append(x)
    head = None
    while head is None:  # the identity head always applies
        head = _attempt(b, choices.choice(HEADS), x)
    outputs = [head]
    if len(b.trunks) > 2 and choices.chance(0.2):
        extra = choices.choice(b.trunks[1:-1])
        if extra not in outputs:
            outputs.append(extra)
            b.log.append("second output")
    dynamic = n == 1 and choices.chance(0.15)
    listed = bool(b.initializers) and choices.chance(0.1)
    model = b.model(["x"], outputs, value_info=not dynamic and choices.chance(0.5), dynamic_batch=dynamic,
                    initializers_as_inputs=listed)
    b.log += ["batch named N"] * dynamic + ["weights listed as inputs"] * listed
    return FuzzGraph(model, opset, b.log)


def fuzz_seed(seed: int) -> FuzzGraph:
    """The graph of one seed of ``python -m models.fuzz``."""
    return generate_graph(RandomChoices(seed))


# -- the oracle -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """``status`` is "pruned", "blocked" or "failed"; ``reason`` says what was removed, what
    blocked it, or what went wrong."""

    status: str
    reason: str


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def blocked_category(reason: str) -> str:
    """A blocking reason without node and tensor names, to count alike reasons together:
    ``"Softmax node 'n7' does not map this axis of 'soft8'"`` -> ``"Softmax: does not map this axis"``."""
    if reason.startswith(("graph output", "graph input")):
        return " ".join(reason.split()[:2])
    match = re.match(r"(\w+) node '[^']*'[:]? ?(.*)", reason)
    op, rest = match.groups() if match else ("", reason)
    rest = re.sub(r"\s*(of|in|to)?\s*'[^']*'", "", rest).split(":")[-1].strip()
    rest = re.sub(r"\d+", "N", rest)
    return f"{op}: {rest}" if op else rest


def _blocked_by(analysis: Analysis) -> str:
    """What blocks a graph none of whose channels can be pruned; graph outputs only when
    nothing else does."""
    found = sorted({blocked_category(r) for g in analysis.groups for r in g.blocked_reasons})
    found += sorted({f"{b.op_type}: {blocked_category(b.reason)}" for b in analysis.barriers})
    inner = [r for r in found if not r.startswith("graph ")]
    return "; ".join(inner or found) or "no weight output axis (no root)"


def _choose(analysis: Analysis, rng: np.random.Generator) -> tuple[float, dict[int, tuple[int, frozenset[int]]]]:
    """A ratio and, per group, that share of its units (rounded down, at most all but one)
    drawn at random among the prunable ones; ``--ratio`` removes that many from every group."""
    ratio = float(rng.uniform(0.1, 0.9))
    for attempt in (ratio, 0.5):
        chosen = {}
        for group in analysis.groups:
            n = len(group.units)
            k = min(math.floor(attempt * n), n - 1, len(group.prunable))
            if k > 0:
                picked = rng.choice(group.prunable, size=k, replace=False)
                chosen[group.id] = (n, frozenset(int(u) for u in picked))
        if chosen:
            return attempt, chosen
    return ratio, {}


def _interface(model: onnx.ModelProto) -> list[tuple[str, str, int, int]]:
    constants = {t.name for t in model.graph.initializer}
    return [
        (kind, v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
        for kind, values in (("input", model.graph.input), ("output", model.graph.output))
        for v in values if v.name not in constants
    ]


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    """The generated graph's input shape, batch 1 where it is named."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value or 1 for d in dims)


def _parameters(model: onnx.ModelProto) -> int:
    """Float weights, not the integer shape parameters a rewrite may add."""
    floating = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floating)


def _prune_exactly(path: Path, seed: int) -> Outcome:
    graph = load_model(path)
    analysis = analyze_graph(graph)
    silent = [g.name for g in analysis.groups for u in g.units if u.blocked and not u.blocked_by.strip()]
    if silent:
        return Outcome("failed", f"units of {silent[0]} are blocked without a reason")
    rng = np.random.default_rng(seed)
    ratio, chosen = _choose(analysis, rng)
    # the criterion steers the plan, so allocation ranks by its scores (measured sensitivity would
    # replace them) and nothing is re-fitted: the oracle checks the op rules' index maps
    config = PruneConfig(ratio=ratio, criterion="chosen_first", allocation="score", refit_rounds=0, round_to=1,
                         min_keep=0.0, seed=seed, verify=False)
    if not any(g.prunable for g in analysis.groups):
        try:
            prune_graph(graph, config)
        except SpaError:
            return Outcome("blocked", _blocked_by(analysis))
        return Outcome("failed", "no group is prunable, yet prune_graph did not refuse")
    if not chosen:
        return Outcome("blocked", "every prunable group has a single channel")
    with steering(chosen):
        first = prune_graph(graph, config)
    if not first.plan.n_removed:
        return Outcome("blocked", "the plan removes nothing")
    zeroed = prune_zeroed(graph, first, replace(config, verify=True), seed)
    feeds, expected, second = zeroed.feeds, zeroed.expected, zeroed.pruned
    if second.plan.removed != first.plan.removed:
        return Outcome("failed", "pruning the zeroed model planned different channels")
    pruned = second.model
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except Exception as exc:
        return Outcome("failed", f"the pruned model fails the full checker: {_first_line(exc)}")
    if _interface(pruned) != _interface(graph.model):
        return Outcome("failed", f"graph inputs/outputs changed: {_interface(graph.model)} -> {_interface(pruned)}")
    if _parameters(pruned) >= _parameters(graph.model):
        return Outcome("failed", "the pruned model is not smaller")
    actual = semantic_outputs(pruned, feeds)
    shapes = ([a.shape for a in expected], [a.shape for a in actual])
    if shapes[0] != shapes[1]:
        return Outcome("failed", f"output shapes changed: {shapes[0]} -> {shapes[1]}")
    if not all(np.isfinite(a).all() for a in expected):
        return Outcome("failed", "the generator made a graph whose outputs are not finite")
    error = relative_error(expected, actual)
    noise = rounding_noise(graph.model, feeds, expected, seed) if not error <= RTOL else 0.0
    tolerance = max(RTOL, min(ROUNDING_MARGIN * noise, MOST_TOLERANCE))
    if not error <= tolerance:
        within = f" (its own rounding moves the outputs by {noise:.2g})" if noise else ""
        return Outcome("failed", f"outputs differ: relative error {error:.3g} > {tolerance:.3g}{within}")
    removed = second.plan.n_removed
    total = sum(len(g.units) for g in second.analysis.groups if g.id in second.plan.removed)
    conditioning = f"; ill-conditioned: error {error:.2g}, rounding noise {noise:.2g}" if noise else ""
    return Outcome("pruned", f"{removed} of {total} channels in {len(second.plan.removed)} groups{conditioning}")


ROUNDING_MARGIN = 30  # an error within this many times the zeroed model's own rounding noise is rounding: a
# sum taken in another order (a pruned tensor's other memory alignment) errs by a few ulps, not one (seed
# 500000532: 2.1e-4 against a one-ulp noise of 1.8e-5; in float64 the pruned and zeroed models agree exactly)
MOST_TOLERANCE = 1e-2  # ... up to this: a wrong index map moves the outputs by far more


def rounding_noise(model: onnx.ModelProto, feeds: dict[str, np.ndarray], expected: list[np.ndarray],
                   seed: int) -> float:
    """The relative change of ``model``'s outputs when its floating-point inputs and weights move
    by their own rounding (each value times ``1 + ε u``, ``ε`` the type's machine epsilon, ``u``
    uniform in [-1, 1], seeded): a graph that amplifies rounding (a normalisation over nearly
    constant values, outputs that nearly cancel) differs from its pruning by as much, with every
    index map right. The weights move too: a channel that its bias dominates hides the input's
    rounding (seed 500000532: an InstanceNormalization over an attention channel of std/mean
    0.005 moved the outputs by 2e-4 with the inputs' rounding alone showing 0, 1e-5 to 4e-5 with
    the weights')."""
    rng = np.random.default_rng(seed)

    def moved(value: np.ndarray) -> np.ndarray:
        if not np.issubdtype(value.dtype, np.floating):
            return value
        return (value * (1 + np.finfo(value.dtype).eps * rng.uniform(-1, 1, value.shape))).astype(value.dtype)

    nudged = onnx.ModelProto()
    nudged.CopyFrom(model)
    for tensor in nudged.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(moved(numpy_helper.to_array(tensor)), tensor.name))
    return relative_error(expected, semantic_outputs(nudged, {name: moved(value) for name, value in feeds.items()}))


def check_graph(fuzz: FuzzGraph, seed: int, workdir: Path) -> Outcome:
    """Run the oracle on one generated graph (``seed`` draws the channels and the inputs). The
    graph is checked to run without onnxruntime's graph optimisations: where only those fail (its
    transpose optimiser on an opset-11 Resize with an empty roi and scales gathers from them), the
    graph is valid and the pruning must cope, as it does with a user's model."""
    try:
        onnx.checker.check_model(fuzz.model, full_check=True)
        feeds = {"x": np.random.default_rng(seed).standard_normal(_input_shape(fuzz.model), np.float32)}
        run_model(fuzz.model, feeds, optimize=False)
    except Exception as exc:
        return Outcome("failed", f"the generator made a graph that is invalid or does not run: {_first_line(exc)}")
    path = workdir / "fuzz.onnx"
    onnx.save_model(fuzz.model, path)
    try:
        return _prune_exactly(path, seed)
    except VerificationError as exc:
        return Outcome("failed", _first_line(exc))
    except SpaError as exc:
        return Outcome("blocked", blocked_category(_first_line(exc)))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome("failed", f"{_first_line(exc)} (at {Path(where.filename).name}:{where.lineno})")


# -- running many ---------------------------------------------------------------------------

@dataclass
class Summary:
    """Outcomes by seed."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    def blocked_by(self) -> Counter:
        """Fully blocked graphs by what blocked them; a graph blocked by several ops counts
        under each."""
        return Counter(r for o in self.outcomes.values() if o.status == "blocked" for r in o.reason.split("; "))

    def failures(self) -> dict[int, Outcome]:
        return {s: o for s, o in self.outcomes.items() if o.status == "failed"}


def run(graphs: int, seed: int = 0, progress: Callable[[int, Summary], None] | None = None) -> Summary:
    """Generate and check graphs ``seed .. seed + graphs - 1``."""
    summary = Summary()
    with tempfile.TemporaryDirectory(prefix="spa-fuzz-") as folder:
        for k in range(graphs):
            summary.outcomes[seed + k] = check_graph(fuzz_seed(seed + k), seed + k, Path(folder))
            if progress:
                progress(k + 1, summary)
    return summary


def _print_summary(summary: Summary, seconds: float) -> None:
    total = len(summary.outcomes)
    print(f"{total} graphs in {seconds:.0f} s")
    rounding = [seed for seed, o in summary.outcomes.items() if o.status == "pruned" and "ill-conditioned" in o.reason]
    print(f"  pruned exactly  {summary.count('pruned'):5d}" + (
        f"   ({len(rounding)} within their own rounding noise: seeds {', '.join(map(str, rounding[:5]))})" if rounding else ""))
    print(f"  fully blocked   {summary.count('blocked'):5d}   by (a graph blocked by several ops counts under each):")
    for reason, count in summary.blocked_by().most_common():
        print(f"    {count:5d}  {reason}")
    failures = summary.failures()
    print(f"  FAILED          {len(failures):5d}")
    for seed, outcome in failures.items():
        print(f"    seed {seed}: {outcome.reason}   (python -m models.fuzz --replay {seed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=100, help="how many graphs (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first graph (default 0)")
    parser.add_argument("--replay", type=int, metavar="SEED", help="check one graph, describe it and its outcome")
    parser.add_argument("--save", type=Path, metavar="PATH", help="with --replay: write the generated model")
    args = parser.parse_args(argv)
    if args.replay is not None:
        fuzz = fuzz_seed(args.replay)
        print(fuzz.describe())
        if args.save:
            onnx.save_model(fuzz.model, args.save)
            print(f"written to {args.save}")
        with tempfile.TemporaryDirectory(prefix="spa-fuzz-") as folder:
            outcome = check_graph(fuzz, args.replay, Path(folder))
        print(f"{outcome.status}: {outcome.reason}")
        return int(outcome.status == "failed")
    start = time.perf_counter()
    every = max(1, args.graphs // 20)

    def progress(done: int, summary: Summary) -> None:
        if done % every == 0 or done == args.graphs:
            print(f"[{done:5d}/{args.graphs}] pruned {summary.count('pruned')}  blocked {summary.count('blocked')}"
                  f"  failed {summary.count('failed')}  ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)

    summary = run(args.graphs, args.seed, progress)
    _print_summary(summary, time.perf_counter() - start)
    return int(bool(summary.failures()))


if __name__ == "__main__":
    sys.exit(main())
