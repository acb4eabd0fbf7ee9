"""Control flow for :func:`~spa_compiler.torch.to_torch`: ONNX ``If``, ``Loop`` and ``Scan`` as modules.

Each subgraph (an If branch, a Loop or Scan body) is converted like a model, by the machinery that
converts the main graph (:func:`~spa_compiler.torch.convert.convert_model`): its formal inputs come
first, then every outer-scope value it reads (at any depth of nesting) as extra inputs. So a weight
both branches of an If read stays one tensor of the enclosing module (tied, as in the ONNX model), and
it is an ``nn.Parameter`` there when a subgraph reads it as a weight (the module's ``trainable_slots``
tell the enclosing conversion which of its inputs are read so); weights local to a subgraph become
parameters of the subgraph's own module. Each subgraph output passes through an Identity, so that an
output which is an input, an outer value, or one of several outputs of a node comes back as itself.
onnx2torch builds its layers (``nn.Conv2d``, ``nn.Linear``, ...) only from initializers and otherwise
computes with the weights as inputs (Gemm, the normalisations); Conv and ConvTranspose lack that path,
which :class:`RunTimeConv` fills (``F.conv{n}d`` / ``F.conv_transpose{n}d`` on the inputs).

The maths, in ONNX's terms:

- **If** (cond; branches read outer values only): ``then_branch()`` when ``bool(cond)`` else
  ``else_branch()``, decided at run time by a Python ``if``.
- **Loop** (inputs ``M``, ``cond``, ``v_1..v_N``; both of the first two optional)::

      i = 0; c = cond (true when absent)
      while (M absent or i < M) and c:
          c, v_1..v_N, s_1..s_K = body(i, c, v_1..v_N); i += 1

  outputs ``v_1..v_N`` (final) and ``stack(s_k of every iteration)`` on a new axis 0. The body's
  condition ends the loop even when the ``cond`` input is absent, as onnxruntime and onnx's reference
  implementation do (the operator's table calls it ignored then).
- **Scan** (opset 9+; ``N`` states, ``num_scan_inputs`` sequences ``x_j``): ``T`` = size of every
  ``x_j`` along ``scan_input_axes[j]``; for ``t`` in ``0..T-1``, ``states, y = body(states, x_j[t])``
  where ``x_j[t]`` is slice ``t`` (``T-1-t`` for a reverse input direction) along that axis; output
  ``N + k`` stacks ``y_k`` of every iteration along ``scan_output_axes[k]`` (in reverse for a reverse
  output direction). Opset 8's Scan (batch axis, ``sequence_lens``) is refused by name.

A Loop or Scan that runs no iteration has no value to give its stacked outputs a shape; it raises.

**Export.** ``torch.onnx.export`` traces Python: an If becomes the branch the example input took (the
exported model has no If and computes that branch for every input), a Loop or Scan is unrolled for the
example's number of iterations. The re-exported model equals the ONNX model only for inputs that take
the same branch and iteration count; the PyTorch module follows the condition and count of each input.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import onnx
import torch
import torch.nn.functional as F
from onnx import defs, helper
from torch import fx, nn

from ..subgraphs import subgraphs_of, walk_nodes

__all__ = ["CONTROL_FLOW_CONVERTERS", "If", "Loop", "RunTimeConv", "Scan", "enclosing_model", "outer_reads"]

_ENCLOSING: contextvars.ContextVar[onnx.ModelProto] = contextvars.ContextVar("enclosing_onnx_model")


@contextlib.contextmanager
def enclosing_model(model: onnx.ModelProto) -> Iterator[None]:
    """While converting ``model``: its IR version and opsets are those of the subgraphs' models."""
    token = _ENCLOSING.set(model)
    try:
        yield
    finally:
        _ENCLOSING.reset(token)


def _since_versions(op_type: str, first: int = 1) -> tuple[int, ...]:
    return tuple(sorted({s.since_version for s in defs.get_all_schemas_with_history()
                         if s.name == op_type and s.domain == "" and s.since_version >= first}))


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (or a subgraph nested in it) reads but does not define, in order of first use."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    reads: dict[str, None] = {}
    for node in graph.node:
        inner = [name for sub in subgraphs_of(node) for name in outer_reads(sub)]
        reads.update((name, None) for name in [*node.input, *inner] if name and name not in defined)
        defined.update(node.output)
    reads.update((v.name, None) for v in graph.output if v.name not in defined)
    return list(reads)


def _weight_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read as weights (``convert.TRAINABLE_USES``) by a node of ``graph`` at any depth."""
    from .convert import _is_trainable_use

    return {name for node in walk_nodes(graph) for slot, name in enumerate(node.input)
            if name and _is_trainable_use(node.op_type, slot)}


def _value_info(name: str, enclosing) -> onnx.ValueInfoProto:
    """The type of an outer value as the enclosing graph (onnx2torch's OnnxGraph) knows it."""
    if name in enclosing.value_info:
        found = onnx.ValueInfoProto()
        found.CopyFrom(enclosing.value_info[name])
        return found
    if name in enclosing.initializers:
        tensor = enclosing.initializers[name].proto
        return helper.make_tensor_value_info(name, tensor.data_type, tensor.dims)
    return onnx.ValueInfoProto(name=name)


def _subgraph_module(graph: onnx.GraphProto, outer: Sequence[str], enclosing) -> fx.GraphModule:
    """``graph`` as a module: ``forward(*formal inputs, *outer)``, its outputs each through an Identity."""
    from .convert import convert_model

    sub = onnx.GraphProto()
    sub.CopyFrom(graph)
    for k, output in enumerate(sub.output):
        returned = f"{output.name}::output_{k}"
        sub.node.append(helper.make_node("Identity", [output.name], [returned], name=f"output_{k}"))
        output.name = returned
    sub.input.extend(_value_info(name, enclosing) for name in outer)
    header = _ENCLOSING.get()
    model = helper.make_model(sub, opset_imports=header.opset_import, ir_version=header.ir_version)
    return convert_model(model)


def _run(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = module(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _single_or_tuple(outputs: Sequence[torch.Tensor]):
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _stacked(steps: list[tuple[torch.Tensor, ...]], axes: Sequence[int], reverse: Sequence[bool], where: str):
    if not steps:
        raise RuntimeError(f"{where} ran no iteration: its stacked outputs have no shape to take")
    stacked = []
    for k, (axis, backwards) in enumerate(zip(axes, reverse)):
        value = torch.stack([step[k] for step in steps], axis)
        stacked.append(torch.flip(value, [axis]) if backwards else value)
    return stacked


class If(nn.Module):
    """ONNX If: ``forward(cond, *outer)`` runs one branch, chosen by ``bool(cond)`` at run time;
    each branch gets the outer values it reads (``then_reads``/``else_reads`` index ``outer``)."""

    def __init__(self, then_branch: fx.GraphModule, else_branch: fx.GraphModule,
                 then_reads: Sequence[int], else_reads: Sequence[int]) -> None:
        super().__init__()
        self.then_branch, self.else_branch = then_branch, else_branch
        self.then_reads, self.else_reads = tuple(then_reads), tuple(else_reads)

    def forward(self, condition: torch.Tensor, *outer: torch.Tensor):
        branch, reads = ((self.then_branch, self.then_reads) if bool(condition)
                         else (self.else_branch, self.else_reads))
        return _single_or_tuple(_run(branch, [outer[i] for i in reads]))


class Loop(nn.Module):
    """ONNX Loop (module docstring): ``forward([M], [cond], *v_initial, *outer)``, ``M`` and ``cond``
    present as the node has them."""

    def __init__(self, body: fx.GraphModule, carried: int, scanned: int, trip_count: bool, condition: bool,
                 where: str) -> None:
        super().__init__()
        self.body, self.carried, self.scanned = body, carried, scanned
        self.trip_count, self.condition, self.where = trip_count, condition, where

    def forward(self, *inputs: torch.Tensor):
        values = list(inputs)
        trip = int(values.pop(0)) if self.trip_count else None
        condition = values.pop(0) if self.condition else torch.tensor(True)
        carried, outer = values[: self.carried], values[self.carried:]
        steps: list[tuple[torch.Tensor, ...]] = []
        i = 0
        while (trip is None or i < trip) and bool(condition):
            outputs = _run(self.body, [torch.tensor(i, dtype=torch.int64), condition, *carried, *outer])
            condition, carried = outputs[0], list(outputs[1: 1 + self.carried])
            steps.append(outputs[1 + self.carried:])
            i += 1
        scans = _stacked(steps, [0] * self.scanned, [False] * self.scanned, self.where) if self.scanned else []
        return _single_or_tuple([*carried, *scans])


class Scan(nn.Module):
    """ONNX Scan, opset 9+ (module docstring): ``forward(*states, *sequences, *outer)``."""

    def __init__(self, body: fx.GraphModule, states: int, input_axes: Sequence[int], input_reverse: Sequence[bool],
                 output_axes: Sequence[int], output_reverse: Sequence[bool], where: str) -> None:
        super().__init__()
        self.body, self.states, self.where = body, states, where
        self.input_axes, self.input_reverse = tuple(input_axes), tuple(input_reverse)
        self.output_axes, self.output_reverse = tuple(output_axes), tuple(output_reverse)

    def forward(self, *inputs: torch.Tensor):
        states = list(inputs[: self.states])
        sequences = inputs[self.states: self.states + len(self.input_axes)]
        outer = inputs[self.states + len(self.input_axes):]
        lengths = {x.shape[axis] for x, axis in zip(sequences, self.input_axes)}
        if len(lengths) != 1:
            raise ValueError(f"{self.where}: scan inputs of different lengths {sorted(lengths)}")
        length = lengths.pop()
        steps: list[tuple[torch.Tensor, ...]] = []
        for t in range(length):
            slices = [x.select(axis, length - 1 - t if backwards else t)
                      for x, axis, backwards in zip(sequences, self.input_axes, self.input_reverse)]
            outputs = _run(self.body, [*states, *slices, *outer])
            states, step = list(outputs[: self.states]), outputs[self.states:]
            steps.append(step)
        scans = _stacked(steps, self.output_axes, self.output_reverse, self.where) if self.output_axes else []
        return _single_or_tuple([*states, *scans])


class RunTimeConv(nn.Module):
    """ONNX Conv or ConvTranspose whose weight (and bias) are inputs: ``forward(x, w, b=None)``."""

    def __init__(self, transpose: bool, stride, padding, dilation, groups: int, output_padding,
                 input_padding: nn.Module | None) -> None:
        super().__init__()
        self.transpose, self.stride, self.padding, self.dilation = transpose, stride, padding, dilation
        self.groups, self.output_padding, self.input_padding = groups, output_padding, input_padding

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.input_padding is not None:
            x = self.input_padding(x)
        rank = w.dim() - 2
        if self.transpose:
            return getattr(F, f"conv_transpose{rank}d")(x, w, b, self.stride, self.padding, self.output_padding,
                                                        self.groups, self.dilation)
        return getattr(F, f"conv{rank}d")(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def convert_conv(node, graph, original):
    if all(name in graph.initializers for name in node.input_values[1:]):
        return original(node, graph)
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
    from onnx2torch.utils.padding import onnx_auto_pad_to_torch_padding

    attributes, transpose = node.attributes, node.operation_type == "ConvTranspose"
    padding, input_padding = onnx_auto_pad_to_torch_padding(auto_pad=attributes.get("auto_pad", "NOTSET"),
                                                            onnx_padding=attributes.get("pads"))
    if transpose and (input_padding is not None or "output_shape" in attributes):
        raise NotImplementedError(f"ConvTranspose node '{node.name}': asymmetric pads or output_shape")
    module = RunTimeConv(transpose, attributes.get("strides", 1), padding, attributes.get("dilations", 1),
                         attributes.get("group", 1), attributes.get("output_padding", 0), input_padding)
    return OperationConverterResult(module, onnx_mapping_from_node(node))


def _graph_attribute(node, key: str) -> onnx.GraphProto:
    return next(a.g for a in node.proto.attribute if a.name == key)


def _result(module: nn.Module, inputs: Sequence[str], trainable: Sequence[bool], node):
    """onnx2torch's result for ``module`` reading ``inputs`` (no empty names); ``trainable_slots``
    are the positions of the inputs a subgraph reads as weights."""
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    module.trainable_slots = frozenset(k for k, flag in enumerate(trainable) if flag)
    return OperationConverterResult(module, OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))


def convert_if(node, graph, original=None):
    branches = [_graph_attribute(node, key) for key in ("then_branch", "else_branch")]
    reads = [outer_reads(branch) for branch in branches]
    outer = list(dict.fromkeys(reads[0] + reads[1]))
    weights = _weight_reads(branches[0]) | _weight_reads(branches[1])
    module = If(*(_subgraph_module(branch, names, graph) for branch, names in zip(branches, reads)),
                *([outer.index(name) for name in names] for names in reads))
    return _result(module, [node.input_values[0], *outer], [False] + [name in weights for name in outer], node)


def _body_inputs(node, formal: int) -> tuple[onnx.GraphProto, list[str], list[bool]]:
    """The body, its outer reads, and which of (its formal inputs from ``formal`` on, outer reads)
    it reads as weights."""
    body = _graph_attribute(node, "body")
    outer = outer_reads(body)
    weights = _weight_reads(body)
    return body, outer, [v.name in weights for v in body.input[formal:]] + [name in weights for name in outer]


def convert_loop(node, graph, original=None):
    where = f"Loop node '{node.name}'"
    trip_count, condition, *initial = list(node.input_values) + [""] * (2 - len(node.input_values))
    body, outer, trainable = _body_inputs(node, 2)
    present = [name for name in (trip_count, condition) if name]
    module = Loop(_subgraph_module(body, outer, graph), len(initial), len(body.output) - 1 - len(initial),
                  bool(trip_count), bool(condition), where)
    return _result(module, [*present, *initial, *outer], [False] * len(present) + trainable, node)


def convert_scan(node, graph, original=None):
    where = f"Scan node '{node.name}'"
    attributes = node.attributes
    sequences = attributes["num_scan_inputs"]
    states = len(node.input_values) - sequences
    if "" in node.input_values:
        raise NotImplementedError(f"{where}: an empty input")
    body, outer, trainable = _body_inputs(node, 0)
    scanned = len(body.output) - states

    def per_value(key: str, count: int) -> list[int]:
        return list(attributes.get(key, [0] * count))

    module = Scan(_subgraph_module(body, outer, graph), states, per_value("scan_input_axes", sequences),
                  [bool(d) for d in per_value("scan_input_directions", sequences)],
                  per_value("scan_output_axes", scanned),
                  [bool(d) for d in per_value("scan_output_directions", scanned)], where)
    return _result(module, [*node.input_values, *outer], trainable, node)


CONTROL_FLOW_CONVERTERS = {  # op type -> (opset versions, converter(node, graph, onnx2torch's converter or None))
    # Conv with run-time weights: a subgraph reads the outer weights as its inputs
    "If": (_since_versions("If"), convert_if),
    "Loop": (_since_versions("Loop"), convert_loop),
    "Scan": (_since_versions("Scan", first=9), convert_scan),
    "Conv": ((1, 11), convert_conv),
    "ConvTranspose": ((1, 11), convert_conv),
}
