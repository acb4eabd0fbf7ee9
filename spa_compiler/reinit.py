"""Fresh weights for a pruned architecture: train it from scratch instead of fine-tuning.

Liu et al., "Rethinking the Value of Network Pruning" (ICLR 2019), found that for structured
pruning the widths a pruning method chooses carry much of the value, and that the same
architecture trained from scratch often matches or beats fine-tuning the inherited weights, when
the training budget is the original one; "Structured Pruning is All You Need at Initialization"
makes the same point for pruning before training. ``--reinit`` writes the pruned architecture with
weights initialised as PyTorch initialises its layers:

- Conv, ConvTranspose, Gemm and MatMul weights: Kaiming-uniform with ``a = sqrt(5)``, that is
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, where ``fan_in`` is the number of inputs one output sums
  (input channels per group times the kernel size; the contracted axis of a Gemm/MatMul weight);
  their biases (the bias input, or a 1-D constant added right after a MatMul) ``U(-1/sqrt(fan_in),
  1/sqrt(fan_in))`` with the same ``fan_in``;
- BatchNormalization to the identity (scale 1, bias 0, mean 0, variance 1); Instance, Layer and
  Group normalisation scale 1, bias 0; embedding tables (the data of a Gather) ``N(0, 1)``.

Every other constant (shape targets, Resize scales, position embeddings added as tensors, masks)
keeps its value. A BatchNorm the exporter folded into its conv is gone from the graph; the conv's
folded bias is re-initialised as a conv bias.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import streaming
from .errors import InputError
from .pipeline import Pass
from .state import PruneState

__all__ = ["Reinitialise", "fresh_weights"]


def _fan_in(op_type: str, weight: np.ndarray, attributes: dict) -> int:
    if op_type == "Conv":
        return int(np.prod(weight.shape[1:]))
    if op_type == "ConvTranspose":
        return int(weight.shape[1] * np.prod(weight.shape[2:]))
    if op_type == "Gemm":
        return int(weight.shape[1] if attributes.get("transB", 0) else weight.shape[0])
    return int(weight.shape[-2])  # MatMul: [..., in, out]


def _fresh(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """New values by initializer name (module docstring); the first reader of a name decides."""
    values = streaming.tensor_values(model.graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    fresh: dict[str, np.ndarray] = {}

    def uniform(name: str, bound: float) -> None:
        if name in values and name not in fresh and np.issubdtype(values[name].dtype, np.floating):
            fresh[name] = rng.uniform(-bound, bound, values[name].shape).astype(values[name].dtype)

    def constant(name: str, fill: float) -> None:
        if name in values and name not in fresh:
            fresh[name] = np.full_like(values[name], fill)

    for node in model.graph.node:
        inputs = list(node.input)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(inputs) > 1 and inputs[1] in values:
            bound = 1.0 / np.sqrt(max(1, _fan_in(node.op_type, values[inputs[1]], attributes)))
            uniform(inputs[1], bound)
            if len(inputs) > 2 and inputs[2]:
                uniform(inputs[2], bound)
            if node.op_type == "MatMul":
                for reader in readers.get(node.output[0], []):
                    biases = [n for n in reader.input if n in values and values[n].ndim == 1]
                    if reader.op_type == "Add" and biases:
                        uniform(biases[0], bound)
        elif node.op_type == "BatchNormalization":
            for name, fill in zip(inputs[1:5], (1.0, 0.0, 0.0, 1.0)):
                constant(name, fill)
        elif node.op_type in ("InstanceNormalization", "LayerNormalization", "GroupNormalization"):
            for name, fill in zip(inputs[1:3], (1.0, 0.0)):
                constant(name, fill)
        elif node.op_type == "Gather" and inputs[0] in values and np.issubdtype(values[inputs[0]].dtype, np.floating):
            if inputs[0] not in fresh:
                fresh[inputs[0]] = rng.standard_normal(values[inputs[0]].shape).astype(values[inputs[0]].dtype)
    return fresh


def fresh_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with freshly initialised weights (module docstring), seeded."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    fresh = _fresh(result, np.random.default_rng(seed))
    tensors = [t for t in result.graph.initializer if t.name in fresh]
    with streaming.replacing(tensors) as replace:
        for tensor in tensors:
            replace(tensor, fresh[tensor.name])
    return result


class Reinitialise(Pass):
    """``--reinit``: replace the pruned model's weights by fresh ones (after verification, which
    compared the pruned weights with the original's)."""

    name, description, requires, provides = "reinit", "initialising fresh weights", ("model",), ("model",)

    def run(self, state: PruneState) -> PruneState:
        if state.graph is not None and (state.graph.quantized or state.graph.integer_weights):
            raise InputError("--reinit writes fresh float weights to train, but this model is quantized; "
                             "prune the float model with --reinit instead")
        state.model = fresh_weights(state.model, state.config.seed)
        return state
