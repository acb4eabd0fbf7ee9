"""Quantized weights: reading them as floats, writing re-fitted floats back quantized.

Two formats made by ``onnxruntime.quantization`` are understood:

* **QDQ** (``quantize_static`` with ``QuantFormat.QDQ``): a weight is stored as an integer
  initializer ``q`` read by ``DequantizeLinear(q, scale, zero_point, axis)``, whose output
  ``w = (q - zero_point) * scale`` (scale and zero point per tensor, or per index of ``axis``) is
  what the Conv/Gemm/MatMul reads. Loading keeps that node (folding would turn the weight into
  floats) and gives its output ``w`` a float value among the graph's constants: the op rules,
  criteria, statistics and re-fit then see an ordinary float weight, while the rewriter slices
  ``q``, ``scale`` and ``zero_point`` and leaves the node in place.
* **Dynamic** (``quantize_dynamic``): ``MatMulInteger``/``ConvInteger`` read the integer weight
  ``q`` directly, with its zero point as an input; its scale multiplies the integer product
  later (``Cast -> Mul(scale_x * scale_w)``). Criteria read ``(q - zero_point) * scale`` through
  :meth:`QuantizedWeight.dequantize`.

A re-fitted float weight is written back by :meth:`QuantizedWeight.quantize` with its original
scale and zero point: ``q = clip(round(w / scale) + zero_point, q_min, q_max)``, where
``[q_min, q_max]`` is the range of the original stored values, not of the integer type: a
model quantized in 7 bits (onnxruntime's ``reduce_range``, for x86 machines without VNNI, whose
int8 convolutions add pairs of products in 16 bits and saturate with 8-bit weights) keeps 7-bit
weights. That is lossy (rounding to the existing grid, clipping to its range), where slicing
alone is exact.

Formats this module does not understand (the QOperator ops such as ``QLinearConv``,
block-wise quantization, 4-bit and float-8 types, contrib-domain Q/DQ) are refused at load by
:func:`unsupported_quantization`, naming the op.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from . import streaming
from .errors import VerificationError

if TYPE_CHECKING:
    from .ir import Graph, Node

__all__ = [
    "QuantizedWeight",
    "FOLD_EXCLUDED",
    "unsupported_quantization",
    "as_stored",
    "dequantized_weights",
    "float_product",
    "integer_weights",
    "requantize",
    "saturation",
    "stored_range",
    "with_float_weights",
    "without_float_view",
    "zero_slabs",
]

log = logging.getLogger(__name__)

FOLD_EXCLUDED = frozenset({"DequantizeLinear"})  # folding one would store its weight as floats
_QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "QAttention",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
_STORAGE_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)
_INTEGER_OPS = {"MatMulInteger": 3, "ConvInteger": 3}  # op -> slot of the weight's zero point


@dataclass(frozen=True)
class QuantizedWeight:
    """A float weight stored as integers: ``w = (q - zero_point) * scale``.

    ``storage`` names the integer initializer ``q``; ``scale`` and ``zero_point`` hold one value
    (per tensor) or one per index of ``axis`` of ``q`` (per channel); ``scale`` is None when it
    could not be found (a dynamic weight whose rescaling is not the usual ``Cast -> Mul``), and
    the weight then reads as ``q - zero_point``.
    """

    storage: str
    scale: np.ndarray | None
    zero_point: np.ndarray
    axis: int | None

    def _along(self, param: np.ndarray, rank: int) -> np.ndarray:
        if self.axis is None or param.size == 1:
            return param.reshape(())
        shape = [1] * rank
        shape[self.axis] = param.size
        return param.reshape(shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``(q - zero_point) * scale`` as float32."""
        centred = q.astype(np.float64) - self._along(self.zero_point.astype(np.float64), q.ndim)
        if self.scale is not None:
            centred = centred * self._along(self.scale.astype(np.float64), q.ndim)
        return centred.astype(np.float32)

    def quantize(self, w: np.ndarray, original: np.ndarray) -> np.ndarray:
        """``clip(round(w / scale) + zero_point, q_min, q_max)`` in the dtype of the ``original``
        stored values, ``[q_min, q_max]`` their range (round half to even, as ``QuantizeLinear``
        does)."""
        if self.scale is None:
            raise ValueError(f"the scale of quantized weight '{self.storage}' is unknown")
        scale = self._along(self.scale.astype(np.float64), w.ndim)
        values = np.rint(w.astype(np.float64) / scale) + self._along(self.zero_point.astype(np.float64), w.ndim)
        low, high = stored_range(original)
        return np.clip(values, low, high).astype(original.dtype)

    def zero(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The stored value of a zero weight at every position: the zero point."""
        return np.broadcast_to(self._along(self.zero_point, len(shape)), shape).astype(dtype)


def _attr(node: onnx.NodeProto, key: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == key:
            return int(onnx.helper.get_attribute_value(attribute))
    return default


def unsupported_quantization(model: onnx.ModelProto) -> str | None:
    """Why this model's quantization cannot be pruned (one sentence naming the op), or None."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _QOPERATOR_OPS:
            return (f"its {node.op_type} node '{node.name}' is in the QOperator format, which spa-prune does not "
                    "rewrite; quantize the float model with QuantFormat.QDQ (or prune it before quantizing)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") \
                and node.domain not in ("", "ai.onnx"):
            return (f"its {node.domain}::{node.op_type} node '{node.name}' (a contrib-domain quantizer, e.g. "
                    "16-bit) is not understood; quantize with the standard ONNX ops")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and _attr(node, "block_size", 0):
            return (f"its {node.op_type} node '{node.name}' quantizes block-wise, which spa-prune does not "
                    "rewrite; use per-tensor or per-channel quantization")
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                and initializers[node.input[0]].data_type not in _STORAGE_TYPES:
            kind = onnx.TensorProto.DataType.Name(initializers[node.input[0]].data_type)
            return (f"its DequantizeLinear node '{node.name}' reads {kind} weights; spa-prune rewrites "
                    "int8, uint8 and int32 quantized weights")
    return None


def _dequantizer(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> QuantizedWeight | None:
    """How a ``DequantizeLinear`` of constants reads its input, or None when its input or
    parameters are computed. The zero point defaults to 0 in the stored type."""
    names = list(node.input) + ["", ""]
    stored, scale = constants.get(names[0]), constants.get(names[1])
    if stored is None or scale is None or (names[2] and names[2] not in constants):
        return None
    zero_point = constants[names[2]] if names[2] else np.zeros((), stored.dtype)
    axis = _attr(node, "axis", 1) % max(stored.ndim, 1) if scale.size > 1 else None
    return QuantizedWeight(names[0], scale, zero_point, axis)


def dequantized_weights(
    model: onnx.ModelProto, constants: dict[str, np.ndarray]
) -> dict[str, tuple[QuantizedWeight, np.ndarray]]:
    """For each ``DequantizeLinear`` of a constant (a QDQ weight or bias) that alone reads it: its
    output's name -> (how it is stored, its float value). A constant read by other nodes too stays
    what it is (the ops reading its dequantized value then see an activation, and are not pruned
    through a weight they do not own alone)."""
    readers = Counter(name for node in model.graph.node for name in node.input)
    found = {}
    for node in model.graph.node:
        weight = _dequantizer(node, constants) if node.op_type == "DequantizeLinear" else None
        if weight is not None and readers[weight.storage] == 1:
            found[node.output[0]] = (weight, weight.dequantize(constants[weight.storage]))
    return found


def _rescaling(graph: "Graph", output: str) -> "Node | None":
    """The ``Mul`` of the rescaling ``quantize_dynamic`` writes after an integer product:
    ``Cast(product) * S``, the Cast and the Mul the only readers of what they read."""
    readers = graph.consumers.get(output, [])
    if len(readers) != 1 or readers[0].op_type != "Cast":
        return None
    readers = graph.consumers.get(readers[0].outputs[0], [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == "Mul" else None


def _scale_of_integer_product(graph: "Graph", output: str) -> np.ndarray | None:
    """The weight's scale in the rescaling after an integer product (:func:`_rescaling`):
    ``S`` is the weight's scale, or ``scale_x * scale_w``."""
    rescale = _rescaling(graph, output)
    if rescale is None:
        return None
    cast_output = graph.consumers[output][0].outputs[0]
    for name in (n for n in rescale.inputs if n != cast_output):
        if graph.is_constant(name):
            return graph.constants[name]
        producer = graph.producer.get(name)
        if producer is not None and producer.op_type == "Mul":
            constant = [graph.constants[i] for i in producer.inputs if graph.is_constant(i)]
            if len(constant) == 1:
                return constant[0]
    return None


def float_product(graph: "Graph", node: "Node") -> tuple[str, str] | None:
    """``(x, y)``: the float tensors an integer product of a dynamic weight computes
    ``y ≈ x · w`` between, when it reads ``DynamicQuantizeLinear(x)`` (values and zero point) and
    its product is rescaled (``y = Cast(product) * scale_x * scale_w``) with the weight's scale
    known; else None. ``y - x · w`` is only the rounding of ``x`` to its dynamic grid, so the
    statistics and the re-fit read ``x`` and write ``w``'s float value, quantized again."""
    weight = graph.integer_weights.get(node.inputs[1])
    quantizer = graph.producer.get(node.inputs[0])
    if weight is None or weight.scale is None or quantizer is None or quantizer.op_type != "DynamicQuantizeLinear":
        return None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else ""
    if quantizer.outputs[0] != node.inputs[0] or zero_point not in ("", *quantizer.outputs[2:3]):
        return None
    rescale = _rescaling(graph, node.outputs[0])
    return (quantizer.inputs[0], rescale.outputs[0]) if rescale is not None else None


def integer_weights(graph: "Graph") -> dict[str, QuantizedWeight]:
    """The constant integer weights read by ``MatMulInteger``/``ConvInteger`` (dynamic
    quantization), by initializer name, with their zero points and (when found) scales."""
    found = {}
    for node in graph.nodes:
        zp_slot = _INTEGER_OPS.get(node.op_type)
        if zp_slot is None or node.domain not in ("", "ai.onnx") or not graph.is_constant(node.inputs[1]):
            continue
        name = node.inputs[1]
        stored = graph.constants[name]
        zp_name = node.inputs[zp_slot] if len(node.inputs) > zp_slot else ""
        zero_point = graph.constants.get(zp_name, np.zeros((), stored.dtype)) if zp_name else np.zeros((), stored.dtype)
        axis = stored.ndim - 1 if node.op_type == "MatMulInteger" else 0  # the output channels
        scale = _scale_of_integer_product(graph, node.outputs[0])
        if scale is not None and scale.size not in (1, stored.shape[axis]):
            scale = None
        if scale is None:
            log.debug("scale of integer weight '%s' not found: criteria read q - zero_point", name)
        if zero_point.size not in (1, stored.shape[axis]):
            continue  # not a zero point this module understands: criteria read q as stored
        per_channel = zero_point.size > 1 or (scale is not None and scale.size > 1)
        found[name] = QuantizedWeight(name, scale, zero_point, axis if per_channel else None)
    return found


def without_float_view(graph: "Graph") -> list[str]:
    """The dynamic weights some integer product of which has no float view
    (:func:`float_product`): compensation and the re-fit leave them as they are."""
    return [name for name in graph.integer_weights
            if any(float_product(graph, node) is None for node in graph.consumers.get(name, []))]


def requantize(graph: "Graph", values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``values`` (new values of constants, e.g. re-fitted weights) as the model stores them:
    every QDQ weight's float value replaced by its quantized storage, and a dynamic weight's
    float value quantized, both at the original scale and zero point (lossy)."""
    result = {}
    for name, value in values.items():
        weight = graph.quantized.get(name)
        if weight is None:
            result[name] = as_stored(graph, name, value)
        else:
            result[weight.storage] = weight.quantize(value, graph.constants[weight.storage])
    return result


def as_stored(graph: "Graph", name: str, value: np.ndarray) -> np.ndarray:
    """A new ``value`` of constant ``name`` as the model stores it: float values of a dynamic
    weight quantized at its original scale and zero point (lossy), anything else as it is."""
    stored = graph.constants.get(name)
    if stored is None or not np.issubdtype(stored.dtype, np.integer) or np.issubdtype(value.dtype, np.integer):
        return value
    weight = graph.integer_weights.get(name)
    if weight is None or weight.scale is None:
        raise VerificationError(f"internal error: float values for integer constant '{name}'; nothing was written")
    return weight.quantize(value, stored)


def stored_range(stored: np.ndarray) -> tuple[int, int]:
    """The range a quantized weight's re-fitted values are clipped to: that of its stored
    values (the integer type's when it holds none)."""
    if stored.size == 0:
        info = np.iinfo(stored.dtype)
        return int(info.min), int(info.max)
    return int(stored.min()), int(stored.max())


def saturation(graph: "Graph", values: dict[str, np.ndarray]) -> tuple[int, int]:
    """How many of ``values`` (new float values of constants) are quantized weights, and how many more
    of their stored values sit at the ends of the original's range once quantized again (values
    beyond it, clipped: :func:`stored_range`)."""
    count = saturated = 0
    quantized = {n: v for n, v in values.items() if n in graph.quantized or n in graph.integer_weights}
    for name, stored in requantize(graph, quantized).items():
        original = graph.constants[name]
        low, high = stored_range(original)
        count += 1
        saturated += int(np.count_nonzero((stored == low) | (stored == high))
                         - np.count_nonzero((original == low) | (original == high)))
    return count, max(saturated, 0)


def with_float_weights(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """``model`` with the ``DequantizeLinear`` nodes writing ``names`` replaced by float
    initializers of their values, so that a session can be fed new float values for them (the
    statistics and re-fit passes). Edits ``model`` in place and returns it."""
    names = set(names)
    initializers = {t.name: t for t in model.graph.initializer}
    kept, added = [], []
    for node in model.graph.node:
        weight = None
        if node.op_type == "DequantizeLinear" and node.output[0] in names:
            constants = {i: streaming.tensor_value(initializers[i]) for i in node.input if i in initializers}
            weight = _dequantizer(node, constants)
        if weight is None:
            kept.append(node)
        else:
            added.append(numpy_helper.from_array(weight.dequantize(constants[weight.storage]), node.output[0]))
    if added:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(added)
    return model


def zero_slabs(graph: "Graph", name: str, value: np.ndarray, axis: int, indices: np.ndarray) -> None:
    """Make the weight slabs ``indices`` of ``axis`` of ``value`` (constant ``name``) read as
    zero: 0 for a float weight, the zero point for an integer one. Edits ``value``."""
    weight = graph.integer_weights.get(name)
    zero = weight.zero(value.shape, value.dtype) if weight is not None else np.zeros(value.shape, value.dtype)
    np.moveaxis(value, axis, 0)[indices] = np.moveaxis(zero, axis, 0)[indices]
