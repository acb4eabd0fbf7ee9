"""Narrow the user's own ``nn.Module`` by a pruning report, so training continues in their code.

The report lists every initializer of the input ONNX model that lost indices, with the indices kept
per axis (``PruneReport.initializers``). Each is matched to a tensor of the module the ONNX file was
exported from:

1. by name (the classic exporter names initializers after parameters: ``features.0.weight``);
2. by value: a parameter or buffer equal to it, or to its transpose (a ``Linear`` applied to a 3-D
   input exports as MatMul with the weight transposed, named ``onnx::MatMul_123``); a tensor whose
   elements are all equal is ambiguous and matches nothing by value;
3. as a folded convolution: the exporter folds an eval-mode BatchNorm into the conv before it,
   ``W' = s * W`` per output channel with ``s = gamma / sqrt(var + eps)``, and
   ``b' = s * (b - mean) + beta``. A conv weight proportional to the initializer per output channel
   is that conv; the BatchNorm reading its output (found by running the module once with forward
   hooks) loses the same output channels, and the folded bias is accounted for by it;
4. as a weight of an ONNX RNN/GRU/LSTM node: W, R and B stack ``nn.LSTM``/``nn.GRU``/``nn.RNN``
   tensors over directions with the gates reordered (``narrow_recurrent``); a zero initial state of
   such a node is torch's default state and needs no tensor.

Weights read inside If/Loop/Scan bodies are matched like the main graph's (hoisted into it as the
pruner does). An initializer that matches nothing is an error, never skipped. Matched tensors are
sliced with the kept indices; where the run re-fitted weights (``compensated``), the pruned file's
values are carried over instead: directly for a one-to-one match, and through ``W = W'' / s``,
``beta = b'' - s * (b - mean)`` for a folded pair (exact: the conv-BN pair then computes ``W'' x + b''``).
Layer attributes follow the new shapes (``in/out_channels``, ``groups`` of depthwise convs,
``in/out_features``, ``num_features``, ``normalized_shape``, ``embedding_dim``, recurrent
``input_size``/``hidden_size``, and head counts:
``heads``/``num_heads``/``num_attention_heads`` next to ``head_dim``/``attention_head_size``, from the
narrowest width of the attention module's Linear layers that changed).
Finally the narrowed module is run on the example inputs and compared with the pruned ONNX model
(onnxruntime); a difference above ``tolerance`` is an error, and so is a module that no longer runs
(its code fixing a width): the error names the layer that failed and the integer attributes of the
user's modules around it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import ModelError
from ..ir import _fold_constants
from ..model_files import read_proto
from ..report import PruneReport
from ..subgraphs import all_initializers, hoist_initializers, walk_nodes
from .narrow_recurrent import (RECURRENT_OPS, narrow_recurrent, recurrent_level, recurrent_sizes, tensor_key,
                               update_recurrent)

__all__ = ["narrow"]

log = logging.getLogger(__name__)

_HEAD_COUNTS = ("heads", "num_heads", "n_head", "num_attention_heads")
_HEAD_SIZES = ("head_dim", "attention_head_size", "head_size")


@dataclass
class _Match:
    """A module tensor standing for an initializer: ``axes[i]`` is the tensor axis of initializer
    axis ``i``; ``scale`` the per-output-channel factor of a folded conv (``W' = scale * W``)."""

    tensor: str
    axes: tuple[int, ...]
    scale: np.ndarray | None = None


def _load_report(report: PruneReport | dict | str | os.PathLike) -> dict[str, Any]:
    if isinstance(report, PruneReport):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    return json.loads(Path(report).read_text())


def _initializers(path: str) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The model's folded initializers, those of If/Loop/Scan bodies included (hoisted into the main
    graph as the pruner does), and per initializer its (op type, slot, node) readers in any scope."""
    model = _fold_constants(read_proto(Path(path))[0])
    hoist_initializers(model)
    values = {t.name: numpy_helper.to_array(t) for t in all_initializers(model.graph)}
    readers: dict[str, list] = {}
    for node in walk_nodes(model.graph):
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, slot, node))
    return values, readers


def _proportional(onnx_value: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Per-output-channel ``s`` with ``onnx_value[o] = s[o] * weight[o]``, or None."""
    flat_w, flat_o = weight.reshape(len(weight), -1), onnx_value.reshape(len(onnx_value), -1)
    norms = (flat_w * flat_w).sum(axis=1)
    if np.any(norms == 0):
        return None
    scale = (flat_o * flat_w).sum(axis=1) / norms
    tolerance = 1e-5 * np.abs(flat_o).max() + 1e-7
    return scale if np.allclose(flat_o, scale[:, None] * flat_w, rtol=1e-4, atol=tolerance) else None


def _match(name: str, value: np.ndarray, readers: list, tensors: dict[str, np.ndarray]) -> _Match | None:
    identity = tuple(range(value.ndim))
    found = tensors.get(name)
    if found is not None and found.shape == value.shape:
        return _Match(name, identity)
    if value.size > 1 and np.ptp(value) == 0:
        return None  # a constant tensor (zero biases of a fresh model) could be any of many
    for key, tensor in tensors.items():
        if tensor.shape == value.shape and np.array_equal(tensor, value):
            return _Match(key, identity)
        if value.ndim == 2 and tensor.shape == value.shape[::-1] and np.array_equal(tensor.T, value):
            return _Match(key, (1, 0))
    if any(op == "Conv" and slot == 1 for op, slot, _ in readers):
        for key, tensor in tensors.items():
            if key.endswith("weight") and tensor.shape == value.shape and value.ndim >= 3:
                scale = _proportional(value, tensor)
                if scale is not None:
                    return _Match(key, identity, scale)
    return None


def _trace_producers(module: nn.Module, example_inputs: tuple) -> dict[str, str]:
    """For every leaf module, the leaf module whose output it reads (by running the module once)."""
    outputs: dict[int, str] = {}
    producers: dict[str, str] = {}
    kept_alive = []

    def hook(name):
        def record(_, args, output):
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in outputs:
                producers[name] = outputs[id(args[0])]
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = name
                kept_alive.append(output)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if not list(m.children())]
    training = module.training
    try:
        with torch.no_grad():
            module.eval()(*example_inputs)
    finally:
        module.train(training)
        for handle in handles:
            handle.remove()
    return producers


def _example_inputs(path: str) -> tuple:
    model = read_proto(Path(path))[0]
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == 1:
            inputs.append(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
        else:
            inputs.append(torch.zeros(shape, dtype=torch.int64))
    return tuple(inputs)


class _Narrowing:
    """The slices and new values of the module's tensors, collected before any is changed."""

    def __init__(self, module: nn.Module, report: dict[str, Any], example_inputs: tuple | None) -> None:
        self.module = module
        self.report = report
        self.original, self.readers = _initializers(report["input"])
        self.pruned, _ = _initializers(report["output"]) if any(
            c["compensated"] for c in report["initializers"]) else ({}, {})
        self.tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        self.example_inputs = example_inputs if example_inputs is not None else _example_inputs(report["input"])
        self.new: dict[str, np.ndarray] = {}

    def kept(self, change: dict) -> dict[int, np.ndarray]:
        return {int(axis): np.asarray(indices, dtype=np.int64) for axis, indices in change["kept"].items()}

    def current(self, tensor: str) -> np.ndarray:
        return self.new.get(tensor, self.tensors[tensor])

    def slice(self, tensor: str, kept: dict[int, np.ndarray]) -> np.ndarray:
        value = self.current(tensor)
        for axis, indices in kept.items():
            value = np.take(value, indices, axis=axis)
        return value

    def collect(self) -> None:
        unmatched, folded = [], {}
        for change in self.report["initializers"]:
            name, kept = change["name"], self.kept(change)
            recurrent = recurrent_level(name, self.readers.get(name, []), self.original, self.module, self.tensors)
            if recurrent is not None:
                self.new.update(narrow_recurrent(*recurrent, kept, change["compensated"], self.current, name))
                continue
            match = _match(name, self.original[name], self.readers.get(name, []), self.tensors)
            if match is None:
                unmatched.append(change)
                continue
            on_tensor = {match.axes[axis]: indices for axis, indices in kept.items()}
            if match.scale is None:
                self.new[match.tensor] = (np.transpose(self.pruned[name], match.axes) if change["compensated"]
                                          else self.slice(match.tensor, on_tensor))
            else:
                folded[match.tensor] = (change, match)
        for change in unmatched:
            if not self._is_folded_bias(change["name"], folded) and not self._is_zero_initial_state(change["name"]):
                raise ModelError(
                    f"initializer '{change['name']}' (shape {change['shape']}) of {self.report['input']} matches no "
                    "parameter or buffer of the module by name, value or folded BatchNorm; pass the module the "
                    "ONNX file was exported from"
                )
        if folded:
            self._narrow_folded(folded)

    def _is_zero_initial_state(self, name: str) -> bool:
        """A zero initial state of recurrent nodes: torch's default state when none is passed."""
        readers = self.readers.get(name, [])
        return bool(readers) and all(op in RECURRENT_OPS and slot in (5, 6) for op, slot, _ in readers) and \
            not np.any(self.original[name])

    def _is_folded_bias(self, name: str, folded: dict) -> bool:
        for op, slot, node in self.readers.get(name, []):
            if op == "Conv" and slot == 2 and any(c["name"] == node.input[1] for c, _ in folded.values()):
                return True
        return False

    def _narrow_folded(self, folded: dict[str, tuple[dict, _Match]]) -> None:
        producers = _trace_producers(self.module, self.example_inputs)
        for weight, (change, match) in folded.items():
            conv = weight.rsplit(".", 1)[0]
            norms = [n for n, p in producers.items() if p == conv and isinstance(self.module.get_submodule(n),
                                                                                     nn.modules.batchnorm._BatchNorm)]
            if len(norms) != 1:
                raise ModelError(f"the ONNX weight '{change['name']}' is '{weight}' scaled per channel, but no single "
                                 "BatchNorm reads that conv's output; cannot narrow it exactly")
            kept = self.kept(change)
            norm = norms[0]
            self.new[weight] = self.slice(weight, kept)
            per_channel = [f"{conv}.bias"] + [f"{norm}.{field}" for field in ("weight", "bias", "running_mean",
                                                                             "running_var")]
            for key in per_channel:  # the conv's own bias went into the folded one too
                if key in self.tensors and self.tensors[key] is not None and 0 in kept:
                    self.new[key] = self.slice(key, {0: kept[0]})
            if change["compensated"]:
                self._carry_folded(change["name"], weight, norm, match.scale[kept.get(0, slice(None))])

    def _carry_folded(self, name: str, weight: str, norm: str, scale: np.ndarray) -> None:
        """``W = W'' / s`` and ``beta = b'' - s * (b - mean)`` (module docstring)."""
        shape = (-1,) + (1,) * (self.pruned[name].ndim - 1)
        self.new[weight] = self.pruned[name] / scale.reshape(shape)
        node = next(node for op, slot, node in self.readers[name] if op == "Conv" and slot == 1)
        if len(node.input) > 2 and node.input[2] in self.pruned:
            bias_name = weight[: -len("weight")] + "bias"
            conv_bias = self.new.get(bias_name, self.tensors.get(bias_name))
            mean = self.new.get(f"{norm}.running_mean", self.tensors[f"{norm}.running_mean"])
            offset = (conv_bias if conv_bias is not None else 0.0) - mean
            self.new[f"{norm}.bias"] = self.pruned[node.input[2]] - scale * offset

    def apply(self) -> None:
        for name, layer in self.module.named_modules():  # refuse before changing anything
            if isinstance(layer, nn.RNNBase):
                recurrent_sizes(name, layer, lambda key, name=name: self.current(tensor_key(name, key)).shape)
        state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        for key, value in self.new.items():
            tensor = state[key]
            tensor.data = torch.tensor(value, dtype=tensor.dtype)  # a copy: the file's arrays may be read-only
        _update_attributes(self.module)


def _update_attributes(module: nn.Module) -> None:
    """Shape attributes of torch layers (and head counts of attention modules) from their tensors."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.RNNBase):
            update_recurrent(name, layer)
        elif isinstance(layer, nn.modules.conv._ConvNd):
            per_group = layer.weight.shape[1]
            if layer.groups > 1 and layer.groups == layer.in_channels and per_group == 1 and not layer.transposed:
                layer.groups = layer.weight.shape[0] // (layer.out_channels // layer.groups)
            if layer.transposed:
                layer.in_channels, layer.out_channels = layer.weight.shape[0], per_group * layer.groups
            else:
                layer.out_channels, layer.in_channels = layer.weight.shape[0], per_group * layer.groups
        elif isinstance(layer, nn.Linear):
            layer.out_features, layer.in_features = layer.weight.shape
        elif isinstance(layer, nn.modules.batchnorm._NormBase):
            layer.num_features = (layer.running_mean if layer.running_mean is not None else layer.weight).shape[0]
        elif isinstance(layer, nn.LayerNorm) and layer.weight is not None:
            layer.normalized_shape = tuple(layer.weight.shape)
        elif isinstance(layer, nn.Embedding):
            layer.num_embeddings, layer.embedding_dim = layer.weight.shape
    for layer in module.modules():  # after the projections' widths
        _update_heads(layer)


def _update_heads(layer: nn.Module) -> None:
    count = next((a for a in _HEAD_COUNTS if isinstance(getattr(layer, a, None), int)), None)
    size = next((a for a in _HEAD_SIZES if isinstance(getattr(layer, a, None), int)), None)
    if count is None or size is None:
        return
    heads, head_size = getattr(layer, count), getattr(layer, size)
    widths = {w for m in layer.children() if isinstance(m, nn.Linear) for w in (m.in_features, m.out_features)
              if w % head_size == 0 and w < heads * head_size}
    if widths:  # a projection narrowed: the narrowest width (the output projection's input) is heads * head_size
        setattr(layer, count, min(widths) // head_size)
        if isinstance(getattr(layer, "all_head_size", None), int):
            layer.all_head_size = min(widths)


def _run_naming_the_failure(module: nn.Module, example_inputs: tuple) -> Any:
    """Run ``module``; when it raises, a ModelError naming the innermost module that was running and
    the integer attributes of the user's own (not torch's) modules around it: a width fixed in code,
    like a ``self.hidden`` the forward splits by."""
    running: list[str] = []

    def leave(*_) -> None:  # a hook returning a value would replace the output
        running.pop()

    handles = [] if isinstance(module, torch.jit.ScriptModule) else [
        hook for name, layer in module.named_modules() for hook in (
            layer.register_forward_pre_hook(lambda *_, name=name: running.append(name)),
            layer.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            return module(*example_inputs)
    except RuntimeError as exc:
        where = [(n or "the module", module.get_submodule(n)) for n in running]
        widths = [f"'{n}' ({type(m).__name__}) {k}={v}" for n, m in where if not type(m).__module__.startswith("torch.")
                  for k, v in vars(m).items() if type(v) is int and not k.startswith("_")]
        at = f" in '{where[-1][0]}' ({type(where[-1][1]).__name__})" if where else ""
        hint = "; ".join(widths) or "e.g. an attention output reshaped to the hidden size"
        raise ModelError(f"the narrowed module no longer runs{at} ({str(exc).splitlines()[0]}); its code may fix a "
                         f"width the pruning changed ({hint})") from exc
    finally:
        for handle in handles:
            handle.remove()


def _check(module: nn.Module, report: dict, example_inputs: tuple, tolerance: float) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(report["output"], providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example_inputs)}
    expected = session.run(None, feeds)[0]
    training = module.training
    try:
        output = _run_naming_the_failure(module.eval(), example_inputs)
    finally:
        module.train(training)
    output = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(output, torch.Tensor):
        log.warning("the narrowed module returns %s, not a tensor: not compared with the pruned model",
                    type(output).__name__)
        return
    error = float(np.abs(output.numpy() - expected).max())
    if output.shape != expected.shape or error > tolerance * max(1.0, float(np.abs(expected).max())):
        raise ModelError(f"the narrowed module differs from the pruned ONNX model {report['output']} by {error:.3g}; "
                         "it is not the module the ONNX file was exported from")


def narrow(module: nn.Module, report: PruneReport | dict | str | os.PathLike,
           example_inputs: tuple | None = None, tolerance: float = 1e-4) -> nn.Module:
    """Apply a pruning ``report`` (a :class:`PruneReport`, its ``to_dict()``, or the path of
    ``--json-report``) to ``module`` in place and return it (module docstring). ``example_inputs``
    (positional, as the ONNX inputs) default to seeded inputs of the ONNX model's input shapes."""
    data = _load_report(report)
    head_dims = [g["name"] for g in data.get("groups", [])
                 if g.get("kind") == "head dims" and g["channels_after"] < g["channels_before"]]
    if head_dims:
        raise ModelError(
            f"the pruning removed head dimensions ({head_dims[0]}{', ...' if len(head_dims) > 1 else ''}), which a "
            "module's own code cannot follow (it scales scores by its head size); prune with --heads "
            "(PruneConfig(head_dims=False)) to narrow this module, or train the pruned file with to_torch")
    if isinstance(module, torch.jit.ScriptModule):
        log.warning("the module is TorchScript: its weights are narrowed, but its constants (in_channels, "
                    "out_features, ...) keep the unpruned widths; rebuild it at the new widths to train it")
    narrowing = _Narrowing(module, data, example_inputs)
    narrowing.collect()
    narrowing.apply()
    _check(module, data, narrowing.example_inputs, tolerance)
    return module
