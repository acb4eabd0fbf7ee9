"""Narrowing torch recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) by ONNX RNN/GRU/LSTM weights.

The exporter writes level ``k`` of a torch layer with ``G`` gates (LSTM 4, GRU 3, RNN 1) and hidden
size ``H`` as one ONNX node whose weights stack the directions (``d = 0`` forward, ``d = 1`` the
``_reverse`` tensors) and reorder the gates (``convert._GATE_ORDER``: torch gate ``p`` is ONNX gate
``order[p]``)::

    W[d] [G*H, I]  rows (g, i) = weight_ih_l{k}[(p, i)]     with g = order[p]
    R[d] [G*H, H]  rows (g, i) = weight_hh_l{k}[(p, i)]
    B[d] [2*G*H]   = bias_ih_l{k} then bias_hh_l{k}, each reordered the same way

so ``torch_tensor = onnx_tensor[d][rows]`` with ``rows = [order[p]*H + i for p, i]``. A node is matched
to a level of a layer when W and R equal that level's tensors through this map (names cannot match).
Kept indices then translate exactly: a hidden unit kept in every gate block (the only structured
pruning of a recurrent width) keeps rows ``p*H + u`` of every torch tensor and columns ``u`` of
``weight_hh``; kept input features are columns of ``weight_ih``. Anything else (a gate block pruned
unevenly, a direction removed) is refused. After the tensors change, ``hidden_size`` and
``input_size`` follow them and the layer's flat-weight list is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..errors import ModelError
from .convert import _GATE_ORDER

__all__ = ["RECURRENT_OPS", "RecurrentLevel", "recurrent_level", "narrow_recurrent", "recurrent_sizes",
           "tensor_key", "update_recurrent"]

RECURRENT_OPS = frozenset(_GATE_ORDER)
_MODES = {"LSTM": ("LSTM",), "GRU": ("GRU",), "RNN": ("RNN_TANH", "RNN_RELU")}
_SUFFIXES = ("", "_reverse")


@dataclass(frozen=True)
class RecurrentLevel:
    """Level ``level`` of the torch recurrent layer ``layer`` (module path), exported as one ``op`` node."""

    layer: str
    level: int
    op: str
    hidden: int
    directions: int
    bias: bool

    def key(self, kind: str, direction: int) -> str:
        return tensor_key(self.layer, f"{kind}_l{self.level}{_SUFFIXES[direction]}")


def tensor_key(layer: str, tensor: str) -> str:
    """The state_dict key of ``tensor`` of the layer at module path ``layer`` ("" for the root)."""
    return f"{layer}.{tensor}" if layer else tensor


def _torch_rows(op: str, hidden: int) -> np.ndarray:
    """Indices of the ONNX gate-stacked rows in torch's gate order (``convert._recurrent``'s map)."""
    return np.array([g * hidden + i for g in _GATE_ORDER[op] for i in range(hidden)], dtype=np.int64)


def _equal(onnx_value: np.ndarray, rows: np.ndarray, level: RecurrentLevel, kind: str,
           tensors: dict[str, np.ndarray]) -> bool:
    for d in range(level.directions):
        tensor = tensors.get(level.key(kind, d))
        if tensor is None or tensor.shape != onnx_value[d].shape or not np.array_equal(onnx_value[d][rows], tensor):
            return False
    return True


def _match_level(op: str, w: np.ndarray, r: np.ndarray, module: nn.Module,
                 tensors: dict[str, np.ndarray]) -> RecurrentLevel | None:
    """The level of a torch recurrent layer of ``module`` whose ``weight_ih``/``weight_hh`` equal the
    node's ``W`` and ``R`` through the gate and direction map (module docstring), or None."""
    directions, hidden = r.shape[0], r.shape[2]
    rows = _torch_rows(op, hidden)
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.RNNBase) or layer.mode not in _MODES[op] or layer.hidden_size != hidden:
            continue
        if getattr(layer, "proj_size", 0) or (2 if layer.bidirectional else 1) != directions:
            continue
        for k in range(layer.num_layers):
            level = RecurrentLevel(name, k, op, hidden, directions, layer.bias)
            if _equal(w, rows, level, "weight_ih", tensors) and _equal(r, rows, level, "weight_hh", tensors):
                return level
    return None


def recurrent_level(name: str, readers: list, values: dict[str, np.ndarray], module: nn.Module,
                    tensors: dict[str, np.ndarray]) -> tuple[RecurrentLevel, int] | None:
    """The torch recurrent level and ONNX slot (1 W, 2 R, 3 B) of initializer ``name`` given its
    (op type, slot, node) ``readers``; None when no recurrent node reads it as a weight, ModelError
    when no torch layer of ``module`` holds that node's W and R."""
    for op, slot, node in readers:
        if op in RECURRENT_OPS and slot in (1, 2, 3):
            w, r = (values.get(node.input[i]) for i in (1, 2))
            level = None if w is None or r is None else _match_level(op, w, r, module, tensors)
            if level is None:
                raise ModelError(f"initializer '{name}' is a weight of {op} node '{node.name}', but no torch {op} "
                                 "layer of the module holds its W and R; pass the module the ONNX file was exported "
                                 "from")
            if slot == 3 and not level.bias:  # torch's exporter writes no B for a layer without bias
                raise ModelError(f"initializer '{name}' is the bias of {op} node '{node.name}', but '{level.layer}' "
                                 "has none (bias=False)")
            return level, slot
    return None


def _units(level: RecurrentLevel, kept: np.ndarray, blocks: int, what: str) -> np.ndarray:
    """The hidden units kept in every one of ``blocks`` gate blocks of ``H`` rows, or ModelError."""
    units = np.unique(kept % level.hidden)
    expected = (np.arange(blocks)[:, None] * level.hidden + units[None, :]).ravel()
    if not np.array_equal(np.sort(kept), expected):
        raise ModelError(f"{what} of {level.op} level {level.level} of '{level.layer}' keeps different hidden units in "
                         "different gates; torch's recurrent layer cannot express it")
    return units


def narrow_recurrent(level: RecurrentLevel, slot: int, kept: dict[int, np.ndarray], compensated: bool, current,
                     name: str) -> dict[str, np.ndarray]:
    """New values of the torch tensors that ONNX input ``slot`` (1 W, 2 R, 3 B) of ``level`` stands for:
    ``kept`` maps ONNX axes to kept indices, ``current(key)`` gives a torch tensor's present value;
    ``name`` is the initializer's, for errors. The re-fit (refit.py) changes Conv, Gemm and MatMul
    weights only: a ``compensated`` recurrent weight is refused rather than sliced."""
    what = f"initializer '{name}' (input {slot} of a {level.op} node)"
    if compensated:
        raise ModelError(f"{what} was re-fitted by the pruning run; narrow carries re-fitted weights of Conv, Gemm "
                         "and MatMul only: prune with refit_rounds=0")
    if 0 in kept and len(kept[0]) != level.directions:
        raise ModelError(f"{what}: a direction of '{level.layer}' was removed; torch's recurrent layer cannot "
                         "express it")
    gates = len(_GATE_ORDER[level.op])
    units = _units(level, kept[1], 2 * gates if slot == 3 else gates, what) if 1 in kept else np.arange(level.hidden)
    torch_rows = (np.arange(gates)[:, None] * level.hidden + units[None, :]).ravel()
    kinds = {1: ("weight_ih",), 2: ("weight_hh",), 3: ("bias_ih", "bias_hh")}[slot]
    new = {}
    for key in (level.key(kind, d) for d in range(level.directions) for kind in kinds):
        value = np.take(current(key), torch_rows, axis=0)
        new[key] = np.take(value, kept[2], axis=1) if 2 in kept else value  # W: input features, R: hidden units
    return new


def recurrent_sizes(name: str, layer: nn.RNNBase, shape) -> tuple[int, int]:
    """``(input_size, hidden_size)`` of ``layer`` (module path ``name``) with its tensors at the shapes
    ``shape(tensor_name)`` gives; ModelError unless every level shares one hidden size (torch's layer
    has one) and each level above the first reads the one below."""
    directions = 2 if layer.bidirectional else 1
    levels = [(k, s) for k in range(layer.num_layers) for s in _SUFFIXES[:directions]]
    hidden = {shape(f"weight_hh_l{k}{s}")[1] for k, s in levels}
    inputs = {shape(f"weight_ih_l{k}{s}")[1] for k, s in levels if k > 0}
    if len(hidden) != 1 or inputs - {directions * min(hidden)}:
        raise ModelError(f"the levels of '{name}' would be narrowed to different hidden sizes {sorted(hidden)}; "
                         f"torch's {type(layer).__name__} has one hidden_size: prune again with its "
                         f"{layer.mode.split('_')[0]} nodes in --exclude")
    return shape("weight_ih_l0")[1], hidden.pop()


def update_recurrent(name: str, layer: nn.RNNBase) -> None:
    """``input_size``/``hidden_size`` from the narrowed tensors, and the flat-weight list torch's
    kernels read rebuilt."""
    layer.input_size, layer.hidden_size = recurrent_sizes(name, layer, lambda key: getattr(layer, key).shape)
    layer._init_flat_weights()
