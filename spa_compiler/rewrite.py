"""The rewriter: emit the physically smaller model once the units to remove are chosen.

Constant tensors are sliced generically (``numpy.delete`` along every axis that loses indices);
each op rule then fixes what slicing cannot express (group counts, split sizes, slice bounds,
reshape targets, gather indices). Intermediate shapes are dropped from the model and inferred
again; graph inputs and outputs are left exactly as they were.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import streaming
from .analysis import Analysis
from .errors import VerificationError
from .ir import Node
from .proto_copy import copy_without_initializers, keep_initializers
from .ops import get_rule
from .quantized import requantize
from .subgraphs import all_initializers, subgraphs_of, walk_nodes
from .unshare import share_identical

__all__ = ["removed_indices", "rewrite_model", "expected_shapes", "slice_constant"]

log = logging.getLogger(__name__)


def removed_indices(analysis: Analysis, removed: dict[int, list[int]]) -> dict[int, np.ndarray]:
    """Sorted indices leaving each axis (by axis id) when the given units of each group go."""
    parts: dict[int, list[np.ndarray]] = {}
    groups = {g.id: g for g in analysis.groups}
    for gid, units in removed.items():
        for k in units:
            for axis, indices in groups[gid].units[k].members.items():
                parts.setdefault(axis, []).append(indices)
    return {axis: np.unique(np.concatenate(chunks)) for axis, chunks in parts.items()}


def slice_constant(analysis: Analysis, removed_by_axis: dict[int, np.ndarray], name: str, value: np.ndarray) -> np.ndarray:
    """``value`` (constant ``name`` at its original shape) without the indices leaving its axes;
    ``value`` itself when nothing leaves."""
    for axis in range(value.ndim):
        axis_id = analysis.axis_id(name, axis)
        gone = removed_by_axis.get(axis_id) if axis_id is not None else None
        if gone is not None and gone.size:
            value = np.delete(value, gone, axis=axis)
    return value


def expected_shapes(analysis: Analysis, removed_by_axis: dict[int, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape after pruning (at the bound input shapes)."""
    shapes = dict(analysis.graph.shapes)
    for axis_id, indices in removed_by_axis.items():
        ref = analysis.axes[axis_id]
        shape = list(shapes[ref.tensor])
        shape[ref.axis] -= len(indices)
        shapes[ref.tensor] = tuple(shape)
    return shapes


class _ProtoRewriter:
    """Implements :class:`spa_compiler.ops.Rewriter` over a copy of the folded model (its main
    graph's initializers are copied one at a time as they are sliced, so that the unsliced
    originals are never copied as a whole)."""

    def __init__(
        self, analysis: Analysis, removed_by_axis: dict[int, np.ndarray], replaced: dict[str, np.ndarray]
    ) -> None:
        self.analysis = analysis
        self.replaced = replaced
        self.graph = analysis.graph
        self.opset = self.graph.opset
        self.removed_by_axis = removed_by_axis
        self.new_shapes = expected_shapes(analysis, removed_by_axis)
        self.model = copy_without_initializers(self.graph.model, {t.name for t in self.graph.model.graph.initializer})
        self.protos = {n.name: n for n in walk_nodes(self.model.graph)}
        self.new_initializers: list[onnx.TensorProto] = []
        self.constant_edits: dict[str, dict[int, int]] = {}

    def removed(self, name: str, axis: int) -> np.ndarray:
        axis_id = self.analysis.axis_id(name, axis)
        found = self.removed_by_axis.get(axis_id) if axis_id is not None else None
        return found if found is not None else np.zeros(0, dtype=np.int64)

    def old_shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shapes[name]

    def new_shape(self, name: str) -> tuple[int, ...]:
        return self.new_shapes[name]

    def constant(self, name: str) -> np.ndarray:
        return self.graph.constants[name]

    def is_constant(self, name: str) -> bool:
        return self.graph.is_constant(name)

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        self.remove_attr(node, key)
        self.protos[node.name].attribute.append(helper.make_attribute(key, value))

    def remove_attr(self, node: Node, key: str) -> None:
        proto = self.protos[node.name]
        kept = [a for a in proto.attribute if a.name != key]
        del proto.attribute[:]
        proto.attribute.extend(kept)

    def set_input(self, node: Node, slot: int, value: np.ndarray) -> None:
        """Give input ``slot`` a new constant of its own (the old one may be shared)."""
        proto = self.protos[node.name]
        name = f"{node.name}__spa_input{slot}"
        self.new_initializers.append(numpy_helper.from_array(np.asarray(value), name))
        while len(proto.input) <= slot:
            proto.input.append("")
        proto.input[slot] = name

    def shape_value(self, name: str) -> list | None:
        return self.analysis.shape_values.value(name) if self.analysis.shape_values else None

    def consumers(self, name: str) -> list[Node]:
        return self.graph.consumers.get(name, [])

    def set_constant_element(self, name: str, index: int, value: int) -> None:
        """Change one element of a shape constant (a head count feeding a run-time target)."""
        edits = self.constant_edits.setdefault(name, {})
        if edits.get(index, value) != value:
            raise VerificationError(
                f"internal error: shape constant '{name}' would need two values at index {index}; nothing was written"
            )
        edits[index] = value

    def _apply_constant_edits(self) -> None:
        for tensor in self.model.graph.initializer:
            edits = self.constant_edits.get(tensor.name)
            if edits:
                value = numpy_helper.to_array(tensor).copy()
                flat = value.reshape(-1)
                for index, new in edits.items():
                    flat[index] = new
                tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

    def slice_constants(self) -> None:
        """Slice every constant; streamed ones (:mod:`spa_compiler.streaming`) are read, sliced and
        written to a scratch data file one at a time, so the new model holds none of their bytes.
        The main graph's initializers enter the new model here, in their order: a sliced one only
        as its new value."""
        main = self.graph.model.graph.initializer
        inner = [t for node in self.model.graph.node for sub in subgraphs_of(node) for t in all_initializers(sub)]
        with streaming.replacing([*main, *inner]) as replace:
            for tensor in main:
                copy = self.model.graph.initializer.add()
                sliced = self._sliced(tensor)
                if sliced is None or streaming.is_external(tensor):
                    copy.CopyFrom(tensor)  # a streamed tensor's proto holds no bytes
                else:
                    copy.name = tensor.name
                if sliced is not None:
                    replace(copy, sliced)
            for tensor in inner:
                sliced = self._sliced(tensor)
                if sliced is not None:
                    replace(tensor, sliced)

    def _sliced(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """The new value of a constant, or None when it keeps its values (a streamed tensor always
        gets one: it is copied to the new model's data)."""
        original = self.graph.constants.get(tensor.name)
        if original is None:
            return None
        replaced = self.replaced.get(tensor.name, original)
        sliced = slice_constant(self.analysis, self.removed_by_axis, tensor.name, replaced)
        return sliced if sliced is not original or streaming.is_external(tensor) else None

    def rewrite_nodes(self) -> None:
        changed = {self.analysis.axes[a].tensor for a in self.removed_by_axis}
        for node in self.graph.nodes:
            if not changed.intersection(node.inputs) and not changed.intersection(node.outputs):
                continue
            rule = get_rule(node.domain, node.op_type, self.opset)
            if rule is not None:
                rule.rewrite(node, self)

    def finish(self) -> onnx.ModelProto:
        self._apply_constant_edits()
        graph = self.model.graph
        graph.initializer.extend(self.new_initializers)
        used = {name for node in walk_nodes(graph) for name in node.input}
        used |= {o.name for o in graph.output}
        keep_initializers(graph, used)
        share_identical(self.model)
        self._sync_initializer_inputs()
        del graph.value_info[:]
        self._reshape_subgraph_values()
        return self.model

    def _reshape_subgraph_values(self) -> None:
        """Inner value infos are dropped (inferred again); a subgraph's formal inputs and outputs
        keep their types and get their new shapes."""
        for node in walk_nodes(self.model.graph):
            for sub in subgraphs_of(node):
                del sub.value_info[:]
                for value in [*sub.input, *sub.output]:
                    new = self.new_shapes.get(value.name)
                    if new is not None and new != self.graph.shapes.get(value.name):
                        dims = value.type.tensor_type.shape.dim
                        for dim, size in zip(dims, new):
                            dim.Clear()
                            dim.dim_value = size

    def _sync_initializer_inputs(self) -> None:
        """Models of IR version < 4 list every initializer among the graph inputs too: keep that
        list in step with the sliced, new and removed initializers."""
        graph = self.model.graph
        initializers = {t.name: t for t in graph.initializer}
        listed = {i.name for i in graph.input}
        inputs = [i for i in graph.input if i.name in self.graph.inputs]
        for value in graph.input:
            if value.name in initializers:
                inputs.append(self._initializer_input(initializers[value.name]))
        if self.model.ir_version < 4:
            inputs += [self._initializer_input(t) for n, t in initializers.items() if n not in listed]
        del graph.input[:]
        graph.input.extend(inputs)

    @staticmethod
    def _initializer_input(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def rewrite_model(
    analysis: Analysis, removed_by_axis: dict[int, np.ndarray], replaced: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """The pruned model, given the sorted indices leaving each axis. ``replaced`` gives new values
    (before slicing) for some constants, e.g. compensated weights; a quantized weight's new value
    is quantized again with its original scale and zero point (lossy)."""
    rewriter = _ProtoRewriter(analysis, removed_by_axis, requantize(analysis.graph, replaced or {}))
    rewriter.slice_constants()
    rewriter.rewrite_nodes()
    return rewriter.finish()
