"""Loading: the one place that knows onnx protobufs and graphsurgeon (files are
read and written by :mod:`spa_compiler.model_files`).

``load_model`` turns an ONNX file into a :class:`Graph`: weights held in ``Constant`` nodes or
computed by constant subgraphs (``ConstantOfShape``, ``Unsqueeze`` of a constant, ...) are folded
into initializers, every reader of a shared vector constant or Reshape target gets its own
copy (:mod:`spa_compiler.unshare`), dynamic input dimensions are bound to concrete sizes for
analysis, and every tensor gets a concrete shape. The graph keeps the model's own (possibly
dynamic) input and output declarations, so the pruned model stays as dynamic as the original.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import streaming
from .model_files import check_input_path, read_proto
from .unshare import unshare
from .errors import InputError, UnsupportedModelError, VerificationError
from .shapes import bind_input_shapes, infer_shapes
from .quantized import FOLD_EXCLUDED, QuantizedWeight, dequantized_weights, integer_weights, unsupported_quantization
from .subgraphs import (
    all_initializers, attribute_subgraphs, boundary_names, flattenable, hoist_initializers,
)

__all__ = [
    "Node",
    "Graph",
    "load_model",
    "DetachedOutputs",
    "detach_non_tensor_outputs",
    "reattach_outputs",
    "STANDARD_DOMAINS",
    "MIN_OPSET",
    "MAX_OPSET",
]

log = logging.getLogger(__name__)

MIN_OPSET = 9
MAX_OPSET = 23
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


@dataclass
class Node:
    """One ONNX node as the compiler sees it: names of its tensors and decoded attributes."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    subgraph_inputs: set[str] = field(default_factory=set)
    boundary: list[str] = field(default_factory=list)  # formal inputs/outputs of its subgraphs
    inner_nodes_analysed: bool = False  # its subgraphs' nodes are nodes of the Graph too
    scope: str = ""  # the control-flow node whose subgraph holds this node ("" at top level)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    @property
    def has_subgraph(self) -> bool:
        return any(
            isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto) for v in self.attrs.values()
        )

    def __str__(self) -> str:
        return f"{self.op_type} node '{self.name}'"


@dataclass
class Graph:
    """A folded ONNX model with concrete shapes for every tensor.

    ``model`` is the folded ModelProto the rewriter edits; ``constants`` maps initializer names
    (of every scope) to arrays (memory-mapped on demand for a streamed model's large weights, which
    ``model`` only refers to: :mod:`spa_compiler.streaming`), and the outputs of
    ``DequantizeLinear`` nodes of constants (QDQ weights) to their float values, ``quantized``
    says how those are stored, ``integer_weights`` how the integer weights of
    ``MatMulInteger``/``ConvInteger`` read as floats (:mod:`spa_compiler.quantized`); ``shapes`` holds concrete shapes with dynamic dimensions bound.
    ``nodes`` lists the nodes inside control-flow subgraphs too, just before their owner, when
    no name repeats across scopes (:mod:`spa_compiler.subgraphs`).
    """

    model: onnx.ModelProto
    nodes: list[Node]
    constants: MutableMapping[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, int]
    input_shapes: dict[str, tuple[int, ...]]
    opset: int
    source: Path | None = None
    uses_external_data: bool = False
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    detached_outputs: "DetachedOutputs" = field(default_factory=lambda: DetachedOutputs())
    """Graph outputs that are not tensors and their stand-ins (:func:`detach_non_tensor_outputs`)."""

    def __post_init__(self) -> None:
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for out in node.outputs:
                if out:
                    self.producer[out] = node
            for name in [*node.inputs, *node.subgraph_inputs]:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.node_by_name = {node.name: node for node in self.nodes}
        self.integer_weights = integer_weights(self)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def rank(self, name: str) -> int:
        return len(self.shapes[name])

    def float_value(self, name: str) -> np.ndarray:
        """A constant's value as the model computes with it: an integer weight of an integer
        op dequantized, any other constant as it is."""
        weight = self.integer_weights.get(name)
        return weight.dequantize(self.constants[name]) if weight is not None else self.constants[name]

    @property
    def float_constants(self) -> Mapping[str, np.ndarray]:
        """The constants by name, as :meth:`float_value` reads them (what compensation and the
        re-fit fit the weights of: a dynamic weight's float value)."""
        return _FloatConstants(self)

    def set_constant(self, name: str, value: np.ndarray) -> None:
        """Give the initializer ``name`` a new value, in ``constants`` and in the model (where a
        streamed one then holds it inline)."""
        self.constants[name] = value
        for tensor in all_initializers(self.model.graph):
            if tensor.name == name:
                tensor.CopyFrom(numpy_helper.from_array(value, name))


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise InputError("the model imports no default ONNX opset; re-export it with a standard opset")


def _reject_unsupported(model: onnx.ModelProto, path: Path) -> int:
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{path} uses opset {opset}; spa-prune reads opsets {MIN_OPSET} to {MAX_OPSET}: "
            "convert it with onnx.version_converter.convert_version(model, 13)"
        )
    if opset > MAX_OPSET:
        raise UnsupportedModelError(
            f"{path} uses opset {opset}; spa-prune reads opsets {MIN_OPSET} to {MAX_OPSET}: "
            f"re-export it with opset {MAX_OPSET} or lower"
        )
    reason = unsupported_quantization(model)
    if reason:
        raise UnsupportedModelError(f"{path} is a quantized model: {reason}")
    return opset


def _needs_folding(model: onnx.ModelProto) -> bool:
    """Whether any node is a Constant, reads only constants, or reads a shape."""
    constants = {t.name for t in model.graph.initializer}
    return any(
        node.op_type in ("Constant", "Shape", "Size")
        or all(not name or name in constants for name in node.input)
        for node in model.graph.node
    )


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold Constant nodes and constant-only subgraphs into initializers (graphsurgeon + ORT)."""
    if not _needs_folding(model):
        return model
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    try:  # known static shapes let graphsurgeon fold Shape nodes too
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.debug("shape inference before folding failed: %s", exc)
    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.CRITICAL  # its warnings are about what stays unfolded
    try:
        graph = gs.import_onnx(model)
        graph.fold_constants(  # its If flattening can break models; quantized weights stay quantized
            fold_shapes=True, error_ok=True, flatten_subgraphs=False,
            should_exclude_node=lambda n: n.op in FOLD_EXCLUDED,
        )
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
    finally:
        G_LOGGER.severity = severity
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    folded.producer_name = model.producer_name
    folded.producer_version = model.producer_version
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    return folded


def _decode_node(proto: onnx.NodeProto, index: int) -> Node:
    attrs: dict[str, Any] = {}
    referenced: set[str] = set()
    for attr in proto.attribute:
        subgraphs = list(attribute_subgraphs(attr))
        if subgraphs:
            for sub in subgraphs:
                referenced |= _outer_references(sub)
            attrs[attr.name] = subgraphs
        else:
            attrs[attr.name] = helper.get_attribute_value(attr)
    for key, value in list(attrs.items()):
        if isinstance(value, bytes):
            attrs[key] = value.decode()
    return Node(
        name=proto.name or f"{proto.op_type}_{index}",
        op_type=proto.op_type,
        domain=proto.domain or "",
        inputs=list(proto.input),
        outputs=list(proto.output),
        attrs=attrs,
        subgraph_inputs=referenced,
        boundary=boundary_names(proto),
    )


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    used = set()
    for node in graph.node:
        used |= set(node.input)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                used |= _outer_references(sub)
    return {name for name in used - local if name}


def load_model(
    path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None, lean: bool = False,
    data_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Graph:
    """Read, fold and shape an ONNX model, its inputs bound by ``input_shapes``, then by the
    calibration arrays' ``data_shapes`` (:func:`~spa_compiler.shapes.bind_input_shapes`). Raises
    :class:`SpaError` subclasses on bad input.

    ``lean`` streams a model from 64 MB of weights (:mod:`spa_compiler.streaming`): its proto then
    refers to scratch files for them, so write it, or a model pruned from it, with
    :func:`~spa_compiler.model_files.save_model`, never ``onnx.save``. Without it, only a model
    beyond one protobuf's size is streamed."""
    path = Path(path)
    check_input_path(path)
    raw, uses_external = read_proto(path, lean)
    opset = _reject_unsupported(raw, path)
    bound = bind_input_shapes(raw, dict(input_shapes or {}), data_shapes)
    model = streaming.fold_without_weights(raw, _fold_constants)
    hoist_initializers(model)
    unshare(model)
    detached = detach_non_tensor_outputs(model)
    dtypes = {
        v.name: v.type.tensor_type.elem_type
        for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]
        if v.type.tensor_type.elem_type
    }
    constants = streaming.tensor_values(model.graph)
    dtypes.update({t.name: t.data_type for t in all_initializers(model.graph)})
    shapes, dtypes = infer_shapes(model, bound, dtypes)
    dequantized = dequantized_weights(model, constants)
    constants.update({name: value for name, (_, value) in dequantized.items()})
    nodes = [_decode_node(n, i) for i, n in enumerate(model.graph.node)]
    _name_unnamed_nodes(model.graph.node, nodes)
    if any(node.boundary for node in nodes) and flattenable(model):
        nodes = _with_inner_nodes(model.graph.node, nodes)
    return Graph(
        model=model,
        nodes=nodes,
        constants=constants,
        inputs=[i.name for i in model.graph.input if i.name not in constants],
        outputs=[o.name for o in model.graph.output],
        shapes=shapes,
        dtypes=dtypes,
        input_shapes=bound,
        opset=opset,
        source=path,
        uses_external_data=uses_external,
        quantized={name: weight for name, (weight, _) in dequantized.items()},
        detached_outputs=detached,
    )


@dataclass(frozen=True)
class DetachedOutputs:
    """Graph outputs that are not tensors, each with its position, and the float tensors their
    nodes read, graph outputs in their stead while spa-prune works (:func:`detach_non_tensor_outputs`)."""

    values: list[tuple[int, onnx.ValueInfoProto]] = field(default_factory=list)
    stand_ins: list[str] = field(default_factory=list)


def detach_non_tensor_outputs(model: onnx.ModelProto) -> DetachedOutputs:
    """Replace, in place, the graph outputs that are not tensors (scikit-learn's ``ZipMap``: a
    sequence of maps from class to probability) by the float tensors their nodes read (the
    probabilities themselves), appended to the outputs unless they are outputs already.
    Statistics, measurements and checks then run on tensors alone; :func:`reattach_outputs`
    restores the interface in the pruned model."""
    values = [(k, value) for k, value in enumerate(model.graph.output) if not value.type.HasField("tensor_type")]
    if not values:
        return DetachedOutputs()
    names = {value.name for _, value in values}
    producers = {name: node for node in model.graph.node for name in node.output if name in names}
    constants = {t.name for t in model.graph.initializer}
    tensors = [value for value in model.graph.output if value.type.HasField("tensor_type")]
    present = {value.name for value in tensors}
    stand_ins = [name for _, value in values if value.name in producers for name in producers[value.name].input
                 if name and name not in constants and name not in present]
    stand_ins = list(dict.fromkeys(stand_ins))
    del model.graph.output[:]
    model.graph.output.extend([*tensors, *(onnx.ValueInfoProto(name=name) for name in stand_ins)])
    return DetachedOutputs([(k, onnx.ValueInfoProto.FromString(v.SerializeToString())) for k, v in values], stand_ins)


def reattach_outputs(model: onnx.ModelProto, detached: DetachedOutputs) -> None:
    """Undo :func:`detach_non_tensor_outputs` in the pruned ``model``, in place: the stand-ins
    leave the outputs and the detached ones return to their positions. Nothing happens when they
    are back already."""
    present = {value.name for value in model.graph.output}
    if not detached.values or all(value.name in present for _, value in detached.values):
        return
    made = {name for node in model.graph.node for name in node.output} | {value.name for value in model.graph.input}
    lost = [value.name for _, value in detached.values if value.name not in made]
    if lost:
        raise VerificationError(
            f"internal error: the pruned model no longer makes output '{lost[0]}'; nothing was written"
        )
    outputs = [value for value in model.graph.output if value.name not in set(detached.stand_ins)]
    for k, value in detached.values:
        outputs.insert(k, value)
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def _name_unnamed_nodes(protos, nodes: list[Node], prefix: str = "") -> None:
    """Give every node of one scope a unique name so reports and ``--exclude`` can refer to it
    (inner scopes' names start with their owner's)."""
    seen: set[str] = set()
    for proto, node in zip(protos, nodes):
        name = node.name if proto.name else prefix + node.name
        while name in seen:
            name = f"{name}_"
        seen.add(name)
        node.name = proto.name = name


def _with_inner_nodes(protos, nodes: list[Node], scope: str = "") -> list[Node]:
    """``nodes`` with the nodes of their subgraphs (recursively) just before each owner."""
    flat: list[Node] = []
    for proto, node in zip(protos, nodes):
        node.scope = scope
        for attr in proto.attribute:
            for k, sub in enumerate(attribute_subgraphs(attr)):
                inner = [_decode_node(n, i) for i, n in enumerate(sub.node)]
                scope = f"{node.name}/{attr.name}" + (f"{k}" if attr.type == onnx.AttributeProto.GRAPHS else "")
                _name_unnamed_nodes(sub.node, inner, scope + "/")
                flat += _with_inner_nodes(sub.node, inner, node.name)
                node.inner_nodes_analysed = True
        flat.append(node)
    return flat


class _FloatConstants(Mapping):
    """A graph's constants as :meth:`Graph.float_value` reads them; nothing is copied ahead."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._graph.constants:
            raise KeyError(name)
        return self._graph.float_value(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._graph.constants)

    def __len__(self) -> int:
        return len(self._graph.constants)
