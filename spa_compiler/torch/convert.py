"""ONNX to a trainable PyTorch module, whatever framework the ONNX model came from.

The conversion is ``onnx2torch`` (a maintained ONNX-to-``torch.fx`` converter): it covers every op
the pruner rewrites in the ``models/`` zoo, the PP-OCR Paddle exports and the Hugging Face
transformers (Conv, BatchNormalization, Gemm/MatMul, attention, Resize, Split/Slice/Concat, the
shape arithmetic of run-time Reshape targets), and its modules export back to ONNX with
``torch.onnx.export``; it is chosen over writing a converter because of that coverage and because
its modules are plain ``torch.fx`` graphs a user can read and edit. What it lacks is filled here,
one small converter per gap:

- **Trainable weights.** onnx2torch registers every initializer that no module converter absorbs
  (MatMul weights, attention projections, position embeddings, LayerNorm parts of decomposed
  graphs) as a *buffer*, one copy per use. Here a floating-point initializer with more than one
  element becomes an ``nn.Parameter`` when it is read as data (by arithmetic, by a
  normalisation's scale or bias, or as the first operand of a data-movement op); scalars, integer
  tensors, and operands such as Resize scales, Clip bounds or Pad values stay buffers. Copies of one
  initializer are merged back into one tensor, so tied weights stay tied while training.
- **BatchNormalization of any rank.** onnx2torch picks ``BatchNorm1d/2d/3d`` from the inferred rank
  of the input and fails when shape inference cannot tell it (PP-OCRv4's recogniser); the
  replacement reads the rank at run time (``F.batch_norm`` accepts ``[N, C, *]``).
- **GreaterOrEqual, LessOrEqual** (opset 12, 16), which the Hugging Face exporters write for
  attention masks, as ``torch.ge`` / ``torch.le``.
- **Flatten at the last axis.** ONNX ``Flatten(axis=rank)`` gives ``[prod(shape), 1]`` (the BERT
  exporters write it for the attention mask); onnx2torch's version fails there.
- **Reshape with allowzero=1** (the dynamo exporter writes it): a 0 in the target is a size of 0,
  which is what ``torch.reshape`` does anyway.
- **Shape with start/end** (opset 15; the dynamo exporter writes it): onnx2torch's module exports a
  Shape whose start and end torch's exporter drops when the input size is static; here it is
  ``_shape_as_tensor(x)[start:end]``, which exports as Shape and Slice.
- **Softmax of opsets 1 to 12** (over the flattened ``[axis:]``; Paddle writes it): onnx2torch
  reshapes back to the shape it saw while tracing, so an export fixed the batch size; here the
  last axis needs no reshape and the others reshape as the input.
- **RNN, GRU, LSTM** (which onnx2torch lacks) as ``nn.RNN/GRU/LSTM`` with the ONNX gate order
  (``iofc``, ``zrh``) permuted to torch's (``ifco``, ``rzh``), directions forward, reverse (run on
  the reversed sequence) and bidirectional; what torch's layers cannot express (peepholes,
  ``sequence_lens``, clipping, other activations, GRU without ``linear_before_reset``, batch-first
  layout) is refused by name.
- **Control flow: If, Loop, Scan** (opset 9+; :mod:`.control_flow`): each branch or body converted
  like a model by :func:`convert_model`, the outer-scope values it reads passed in (so a weight both
  branches read stays one parameter), Conv and ConvTranspose computing with such weights as inputs;
  an If decides at run time, a Loop or Scan iterates in Python. A re-export by ``torch.onnx.export``
  traces: it keeps the branch and the iteration count of the example input.
- **No torchvision.** onnx2torch imports torchvision for NonMaxSuppression and RoiAlign alone;
  without torchvision those two converters are withdrawn (a model using them is refused by name)
  and nothing else is needed.

Inputs are bound to the graph's input names (positional in graph order, or by keyword);
the module is in eval mode, like the ONNX model.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx, nn

from ..errors import UnsupportedModelError
from ..ir import _fold_constants
from ..model_files import check_input_path, read_proto
from ..subgraphs import hoist_initializers
from .control_flow import CONTROL_FLOW_CONVERTERS, enclosing_model

__all__ = ["to_torch", "convert_model", "TRAINABLE_USES"]

log = logging.getLogger(__name__)

_ARITHMETIC = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "PRelu", "Einsum"}
_NORMALISATION_AFFINE = {"BatchNormalization": (1, 2), "InstanceNormalization": (1, 2),
                         "LayerNormalization": (1, 2), "GroupNormalization": (1, 2)}
_DATA_MOVEMENT = {"Gather", "Concat", "Expand", "Tile", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
                  "Flatten", "Slice", "Split", "Identity"}
TRAINABLE_USES = (_ARITHMETIC, _NORMALISATION_AFFINE, _DATA_MOVEMENT)
"""Which (op, input slot) reads of a floating-point initializer make it a weight: any slot of an
arithmetic op, the scale and bias of a normalisation, the data operand (slot 0) of data movement
(every Concat operand)."""

class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm`` over axis 1 of an ``[N, C, *]`` input of any rank (ONNX BatchNormalization)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormalization needs an input of rank 2 or more, got rank {input.dim()}")


class Comparison(nn.Module):
    """An element-wise comparison with numpy broadcasting (``torch.ge``, ``torch.le``)."""

    def __init__(self, compare) -> None:
        super().__init__()
        self.compare = compare

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.compare(a, b)


class Flatten(nn.Module):
    """ONNX Flatten: ``[prod(shape[:axis]), prod(shape[axis:])]``, either factor possibly 1."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis if self.axis >= 0 else self.axis + x.dim()
        if axis == 0:
            return x.reshape(1, -1)
        x = torch.flatten(x, end_dim=axis - 1)
        return torch.flatten(x, start_dim=1) if x.dim() > 1 else x.unsqueeze(1)


class LegacySoftmax(nn.Module):
    """ONNX Softmax/LogSoftmax before opset 13: over the input flattened to ``[prod(:axis), prod(axis:)]``."""

    def __init__(self, axis: int, log: bool) -> None:
        super().__init__()
        self.axis, self.log = axis, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis if self.axis >= 0 else self.axis + x.dim()
        flat = x if axis == x.dim() - 1 else torch.flatten(x, start_dim=axis)
        result = torch.log_softmax(flat, -1) if self.log else torch.softmax(flat, -1)
        return result if flat is x else result.reshape_as(x)


_GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}  # torch's gates, as ONNX gate indices
_TORCH_RECURRENT = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class Recurrent(nn.Module):
    """ONNX RNN/GRU/LSTM (layout 0: ``X [seq, batch, input]``) on a torch recurrent layer:
    ``Y [seq, directions, batch, hidden]``, ``Y_h`` (and ``Y_c``) ``[directions, batch, hidden]``."""

    def __init__(self, layer: nn.RNNBase, reverse: bool) -> None:
        super().__init__()
        self.layer, self.reverse = layer, reverse

    def forward(self, x: torch.Tensor, initial_h: torch.Tensor | None = None,
                initial_c: torch.Tensor | None = None):
        if self.reverse:
            x = torch.flip(x, [0])
        if isinstance(self.layer, nn.LSTM):
            state = None if initial_h is None else (initial_h, initial_c if initial_c is not None
                                                    else torch.zeros_like(initial_h))
        else:
            state = initial_h
        y, final = self.layer(x, state)
        if self.reverse:
            y = torch.flip(y, [0])
        directions = 2 if self.layer.bidirectional else 1
        y = y.reshape(y.shape[0], y.shape[1], directions, -1).transpose(1, 2)
        return (y, *final) if isinstance(final, tuple) else (y, final)


def _recurrent(node, graph, original=None):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    op, inputs, attributes = node.operation_type, list(node.input_values) + [""] * 8, node.attributes
    name = f"{op} node '{node.name}'"
    if not all(value in graph.initializers for value in inputs[1:3]):
        raise NotImplementedError(f"{name}: weights computed at run time")
    refused = [key for key in ("clip", "activation_alpha", "activation_beta") if key in attributes]
    activations = [a.decode() if isinstance(a, bytes) else a for a in attributes.get("activations", [])]
    directions = graph.initializers[inputs[1]].to_torch().shape[0] if inputs[1] in graph.initializers else 1
    refused += ["activations"] * bool(activations and activations != _DEFAULT_ACTIVATIONS[op] * directions)
    refused += ["input_forget"] * bool(attributes.get("input_forget", 0)) + ["layout=1"] * bool(attributes.get("layout", 0))
    refused += ["sequence_lens"] * bool(inputs[4]) + ["peepholes"] * bool(op == "LSTM" and inputs[7])
    refused += ["linear_before_reset=0"] * bool(op == "GRU" and not attributes.get("linear_before_reset", 0))
    if refused:
        raise NotImplementedError(f"{name}: {', '.join(refused)} (torch's recurrent layers cannot express it)")
    w, r = (graph.initializers[value].to_torch() for value in inputs[1:3])
    hidden = attributes["hidden_size"]
    b = graph.initializers[inputs[3]].to_torch() if inputs[3] else torch.zeros(directions, 2 * w.shape[1])
    layer = _TORCH_RECURRENT[op](w.shape[2], hidden, bidirectional=directions == 2)
    order = [g * hidden + i for g in _GATE_ORDER[op] for i in range(hidden)]
    with torch.no_grad():
        for d, suffix in enumerate(("", "_reverse")[:directions]):
            for kind, value in (("weight_ih", w[d]), ("weight_hh", r[d]), ("bias_ih", b[d, : w.shape[1]]),
                                ("bias_hh", b[d, w.shape[1]:])):
                getattr(layer, f"{kind}_l0{suffix}").copy_(value[order])
    reverse = attributes.get("direction", b"forward") in (b"reverse", "reverse")
    states = tuple(inputs[5:7] if op == "LSTM" else inputs[5:6])
    return OperationConverterResult(Recurrent(layer, reverse),
                                    OnnxMapping(inputs=(inputs[0], *states), outputs=node.output_values))


class Shape(nn.Module):
    """ONNX Shape: the input's sizes ``[start:end]`` as an int64 tensor (traced as Shape, Slice)."""

    def __init__(self, start: int, end: int | None) -> None:
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._shape_as_tensor(x)[self.start:self.end]


@functools.cache
def _reshape_allow_zero_class() -> type[nn.Module]:
    from onnx2torch.utils.custom_export_to_onnx import DefaultExportToOnnx, OnnxToTorchModuleWithCustomExport

    class ReshapeAllowZero(nn.Module, OnnxToTorchModuleWithCustomExport):
        """ONNX Reshape with ``allowzero=1``: ``torch.reshape`` to the target as given."""

        def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
            def reshape() -> torch.Tensor:
                return torch.reshape(x, torch.Size(shape.tolist()))

            if torch.onnx.is_in_onnx_export():
                return DefaultExportToOnnx.export(reshape, "Reshape", x, shape, {"allowzero_i": 1})
            return reshape()

    return ReshapeAllowZero


def _batch_norm(node, graph, original):
    if not all(name in graph.initializers for name in node.input_values[1:]) or len(node.output_values) != 1:
        return original(node, graph)
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    scale, bias, mean, var = (graph.initializers[name].to_torch() for name in node.input_values[1:5])
    module = AnyRankBatchNorm(scale.shape[0], eps=node.attributes.get("epsilon", 1e-5),
                              momentum=1 - node.attributes.get("momentum", 0.9))
    with torch.no_grad():
        for target, value in ((module.weight, scale), (module.bias, bias), (module.running_mean, mean),
                              (module.running_var, var)):
            target.copy_(value)
    return OperationConverterResult(module, OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))


def _simple(make: Callable[[Any], nn.Module]):
    """A converter building ``make(node)``, whose forward takes the node's inputs in order."""

    def convert(node, graph, original=None):
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

        return OperationConverterResult(make(node), onnx_mapping_from_node(node))

    return convert


def _reshape(node, graph, original):
    if node.attributes.get("allowzero", 0) != 1:
        return original(node, graph)
    return _simple(lambda _: _reshape_allow_zero_class()())(node, graph)


_CONVERTERS = {  # op type -> (opset versions, converter(node, graph, onnx2torch's converter or None))
    "BatchNormalization": ((9, 14, 15), _batch_norm),
    "Flatten": ((9, 11, 13), _simple(lambda node: Flatten(node.attributes.get("axis", 1)))),
    "Reshape": ((5, 13, 14), _reshape),
    "Shape": ((1, 13, 15), _simple(lambda node: Shape(node.attributes.get("start", 0), node.attributes.get("end")))),
    "Softmax": ((1, 11), _simple(lambda node: LegacySoftmax(node.attributes.get("axis", 1), False))),
    "LogSoftmax": ((1, 11), _simple(lambda node: LegacySoftmax(node.attributes.get("axis", 1), True))),
    "LSTM": ((1, 7, 14, 22), _recurrent),
    "GRU": ((1, 3, 7, 14, 22), _recurrent),
    "RNN": ((1, 7, 14, 22), _recurrent),
    "GreaterOrEqual": ((12, 16), _simple(lambda _: Comparison(torch.ge))),
    "LessOrEqual": ((12, 16), _simple(lambda _: Comparison(torch.le))),
    **CONTROL_FLOW_CONVERTERS,
}
_NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")
_onnx2torch: types.ModuleType | None = None


def _import_onnx2torch() -> types.ModuleType:
    """onnx2torch with the converters of this module installed; importable without torchvision
    (then the two converters that need it are withdrawn)."""
    global _onnx2torch
    if _onnx2torch is not None:
        return _onnx2torch
    if importlib.util.find_spec("onnx2torch") is None:
        raise UnsupportedModelError("to_torch needs onnx2torch: pip install 'spa-prune[torch]'")
    placeholder = None
    if importlib.util.find_spec("torchvision") is None:
        placeholder = types.ModuleType("torchvision")
        placeholder.ops = types.ModuleType("torchvision.ops")
        placeholder.ops.roi_align = None
        sys.modules.update({"torchvision": placeholder, "torchvision.ops": placeholder.ops})
    try:
        import onnx2torch
        from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    finally:
        if placeholder is not None:
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    if placeholder is not None:
        for description in [d for d in _CONVERTER_REGISTRY if d.operation_type in _NEEDS_TORCHVISION]:
            del _CONVERTER_REGISTRY[description]
    for op_type, (versions, converter) in _CONVERTERS.items():
        for version in versions:
            key = OperationDescription("", op_type, version)
            _CONVERTER_REGISTRY[key] = functools.partial(converter, original=_CONVERTER_REGISTRY.get(key))
    _onnx2torch = onnx2torch
    return onnx2torch


def _is_trainable_use(op_type: str, slot: int) -> bool:
    if op_type in _ARITHMETIC or (op_type in _DATA_MOVEMENT and (slot == 0 or op_type == "Concat")):
        return True
    return slot in _NORMALISATION_AFFINE.get(op_type, ())


def _initializer_uses(module: fx.GraphModule, op_types: Mapping[str, str]) -> dict[str, tuple[str, bool]]:
    """Per initializer buffer (``initializers.onnx_initializer_k``): its ONNX name, and whether the
    node reading it reads a weight (see ``TRAINABLE_USES``; a control-flow module says which of its
    inputs its subgraphs read as weights in ``trainable_slots``)."""
    uses: dict[str, tuple[str, bool]] = {}
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        called = module.get_submodule(node.target)
        mapping = getattr(called, "onnx_mapping", None)
        if mapping is None:
            continue
        bound = list(node.args) + list(node.kwargs.values())
        slots = [i for i, name in enumerate(mapping.inputs) if name]
        for slot, argument in zip(slots, bound):
            if isinstance(argument, fx.Node) and argument.op == "get_attr":
                trainable = (slot in called.trainable_slots if hasattr(called, "trainable_slots")
                             else _is_trainable_use(op_types[node.target], slot))
                uses[argument.target] = (mapping.inputs[slot], trainable)
    return uses


def _promote_weights(module: fx.GraphModule, op_types: Mapping[str, str]) -> dict[str, str]:
    """Merge copies of one initializer and make weights ``nn.Parameter``s (module docstring);
    returns the ONNX initializer name of every tensor kept in ``module.initializers``."""
    if not hasattr(module, "initializers"):
        return {}
    container = module.get_submodule("initializers")
    uses = _initializer_uses(module, op_types)
    first: dict[str, str] = {}
    for node in list(module.graph.nodes):
        if node.op != "get_attr" or node.target not in uses:
            continue
        onnx_name, trainable = uses[node.target]
        local = node.target.split(".", 1)[1]
        if onnx_name in first and first[onnx_name] != node.target:
            node.target = first[onnx_name]
            delattr(container, local)
            continue
        first[onnx_name] = node.target
        tensor = getattr(container, local)
        if trainable and tensor.is_floating_point() and tensor.numel() > 1:
            delattr(container, local)
            container.register_parameter(local, nn.Parameter(tensor.clone()))
    module.recompile()
    return {target.split(".", 1)[1]: name for name, target in first.items()}


def convert_model(model: onnx.ModelProto) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` with weights as parameters (module docstring); a
    control-flow subgraph is converted by this too. Raises ``NotImplementedError`` naming an op no
    converter covers."""
    onnx2torch = _import_onnx2torch()
    constants = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in constants]
    with enclosing_model(model):
        module = onnx2torch.convert(model, save_input_names=all(n.isidentifier() for n in names),
                                    attach_onnx_mapping=True)
    from onnx2torch.onnx_graph import OnnxGraph

    op_types = {name: node.operation_type for name, node in OnnxGraph(model.graph).nodes.items()}
    module.onnx_names = _promote_weights(module, op_types)
    return module


def to_torch(path: str | os.PathLike) -> fx.GraphModule:
    """A trainable ``torch.fx.GraphModule`` computing the ONNX model at ``path``.

    Constant nodes are first folded into initializers and subgraph initializers hoisted into the
    main graph (as the pruner loads models), so Paddle weights kept in Constant nodes become
    parameters too, and a weight two branches read stays one; dynamic input sizes stay dynamic.
    ``module.onnx_names`` maps each tensor of ``module.initializers`` to its ONNX initializer.
    Raises :class:`UnsupportedModelError` naming an op no converter covers.
    """
    _import_onnx2torch()
    check_input_path(Path(path))
    model = _fold_constants(read_proto(Path(path))[0])
    hoist_initializers(model)
    try:
        module = convert_model(model)
    except NotImplementedError as exc:
        raise UnsupportedModelError(f"{path}: cannot convert to PyTorch: {exc}; the ONNX model itself is fine") from exc
    return module.eval()
