"""The exactness check of DESIGN invariant 3, shared by the test suite, ``models.fuzz`` and
``models.hf_zoo``.

Channels whose outgoing effect is zero can be removed without changing any output. To make a
chosen set of channels have no effect, every weight slab that *reads* them (the Conv, Gemm and
MatMul input slices op rules tag ``"consumer"``) is set to zero; the pruned model must then
reproduce the zeroed model's outputs, and any wrong index map, stale attribute or mis-sliced
constant shows up as a difference.

A channel contracted in a product of two activations (Q·Kᵀ over the dimensions of a single
head) is read by no weight; :func:`zero_contracted` zeroes it at its source instead.

The zeroed model is pruned with its plan *steered* to the channels zeroed (:func:`steering`):
zeroing changes what a criterion or a sensitivity measurement sees, and a plan chosen anew could
remove other channels. :func:`steered_error` runs the whole check on any model.

Both models run without onnxruntime's graph optimisations (:func:`semantic_outputs`): the check
is of the index maps, against what the ONNX graph computes, and the optimiser is not always
right. onnxruntime 1.23 to 1.32 fuse a Transpose of the last two axes into a following MatMul
with a 1-D weight (``FusedMatMul``, ``transA``) and compute another product: a fuzzed graph's
zeroed model came out 1.02 relative from its own unoptimised outputs (``models.fuzz`` seed
123007194), while its pruning, one of those widths left, was exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import ClassVar, Iterator

import numpy as np
import onnx

from spa_compiler import (
    Analysis, Criterion, Graph, PruneConfig, PruneState, prune_graph, register_criterion, synthetic_inputs,
)
from spa_compiler.verify import run_model

__all__ = [
    "randomize_weights", "zero_readers", "zero_contracted", "relative_error", "ChosenFirst", "steering", "steered_error",
    "ZeroedPruning", "prune_zeroed", "semantic_outputs", "RTOL",
]

RTOL = 1e-4
"""Relative error above which a pruned model is not exact (rounding stays far below)."""

WEIGHT_CONSUMERS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "Add", "Sub", "Mul", "PRelu",
}


def randomize_weights(graph: Graph, seed: int = 0) -> Graph:
    """Give every float constant read by a weighted or affine op seeded random values (positive
    where it is a BatchNorm variance) so that no two channels are alike; parameters such as
    Resize scales keep their values."""
    rng = np.random.default_rng(seed)
    variances = {n.inputs[4] for n in graph.nodes if n.op_type == "BatchNormalization"}
    weights = {name for n in graph.nodes if n.op_type in WEIGHT_CONSUMERS for name in n.inputs}
    for name, value in list(graph.constants.items()):
        if name not in weights or not np.issubdtype(value.dtype, np.floating) or value.size < 2:
            continue
        fan_in = max(1, int(np.prod(value.shape[1:]))) if value.ndim > 1 else 1
        fresh = rng.standard_normal(value.shape) / np.sqrt(fan_in)
        if name in variances:
            fresh = 0.5 + np.abs(fresh)
        graph.set_constant(name, fresh.astype(value.dtype))
    return graph


@register_criterion("chosen_first")
class ChosenFirst(Criterion):
    """Scores the chosen units 0 and all others 1, so the plan removes those first (testing only)."""

    description = "the units an exactness check chose score lowest (testing only)"
    chosen: ClassVar[dict[int, tuple[int, frozenset[int]]]] = {}

    def score(self, group, ctx) -> np.ndarray:
        n_units, chosen = self.chosen.get(group.id, (len(group.units), frozenset()))
        if n_units != len(group.units):
            raise RuntimeError(f"group {group.id} ({group.name}) is not the group the units were chosen from")
        scores = np.ones(n_units)
        scores[sorted(chosen)] = 0.0
        return scores


@contextlib.contextmanager
def steering(chosen: dict[int, tuple[int, frozenset[int]]]) -> Iterator[None]:
    """Within the block, criterion ``chosen_first`` removes ``chosen`` first: group id ->
    (the group's unit count, the unit indices)."""
    ChosenFirst.chosen = chosen
    try:
        yield
    finally:
        ChosenFirst.chosen = {}


@dataclass(frozen=True)
class ZeroedPruning:
    """A zeroed model and its pruning: the inputs, the zeroed model's outputs on them, the pruning."""

    feeds: dict[str, np.ndarray]
    expected: list[np.ndarray]
    pruned: PruneState


def prune_zeroed(graph: Graph, first: PruneState, config: PruneConfig, seed: int = 0) -> ZeroedPruning:
    """Zero in ``graph`` (in place) the readers, and the contracted sources, of the channels the
    plan of ``first`` (a pruning of ``graph``) removes; run it on seeded synthetic inputs; prune
    it with ``config`` and the plan steered to the same channels (allocation by the steering
    scores, nothing re-fitted)."""
    groups = {g.id: g for g in first.analysis.groups}
    chosen = {gid: (len(groups[gid].units), frozenset(units)) for gid, units in first.plan.removed.items()}
    zero_readers(graph, first.analysis, first.removed_by_axis)
    zero_contracted(graph, first.analysis, first.plan.removed)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed)
    expected = semantic_outputs(graph.model, feeds)
    with steering(chosen):
        pruned = prune_graph(graph, replace(config, criterion="chosen_first", allocation="score", refit_rounds=0))
    return ZeroedPruning(feeds, expected, pruned)


def steered_error(graph: Graph, config: PruneConfig, seed: int = 0) -> tuple[float, int]:
    """``(relative error, channels removed)`` of the exactness check on ``graph`` (changed in
    place): pruned with ``config``, then :func:`prune_zeroed` (head dimensions left unrotated:
    the op rules' index maps are checked, not the rotation). The error is between the zeroed
    graph's outputs and its pruning's: rounding only, when every op rule maps its indices right."""
    plain = replace(config, head_dims=False)
    first = prune_graph(graph, plain)
    check = prune_zeroed(graph, first, plain, seed)
    if check.pruned.plan.removed != first.plan.removed:
        raise RuntimeError("the steered plan removes other channels than the first")
    return relative_error(check.expected, semantic_outputs(check.pruned.model, check.feeds)), check.pruned.plan.n_removed


def semantic_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``model`` on ``feeds``, run by onnxruntime without graph optimisations
    (see the module docstring)."""
    return run_model(model, feeds, optimize=False)


def _zero_slabs(graph: Graph, analysis: Analysis, slabs: dict[int, np.ndarray]) -> list[str]:
    """Zero the given indices of the given constant axes (axis id -> indices), each constant
    once; returns the names of the constants changed."""
    zeroed: dict[str, np.ndarray] = {}
    for axis_id, indices in slabs.items():
        ref = analysis.axes[axis_id]
        value = zeroed.setdefault(ref.tensor, graph.constants[ref.tensor].copy())
        np.moveaxis(value, ref.axis, 0)[indices] = 0
    for name, value in zeroed.items():
        graph.set_constant(name, value)
    return sorted(zeroed)


def zero_readers(graph: Graph, analysis: Analysis, removed_by_axis: dict[int, np.ndarray]) -> list[str]:
    """Zero the slabs of every consumer weight axis that read the removed indices
    (``removed_by_axis``: axis id of ``analysis`` -> indices), each weight once, in ``graph``'s
    constants and model. Returns the names of the weights changed."""
    consumer_axes = set(analysis.tags.get("consumer", []))
    return _zero_slabs(graph, analysis, {a: i for a, i in removed_by_axis.items() if a in consumer_axes})


def zero_contracted(graph: Graph, analysis: Analysis, removed: dict[int, list[int]]) -> list[str]:
    """For the removed units (group id -> unit indices) that a MatMul of two activations
    contracts (none for a MatMul of unknown shapes, a barrier), zero their source: their slabs of
    the weight output axes (roots) and of the constants added to them (biases). A projection
    ``x @ W + b`` followed by Reshape and Transpose then delivers exact zeros to the product.
    Returns the names of the constants changed."""
    model = analysis.graph
    contracted: set[int] = set()
    biases: set[str] = set()
    for node in model.nodes:
        constant = [model.is_constant(i) for i in node.inputs]
        if node.op_type == "MatMul" and not any(constant) and all(i in model.shapes for i in node.inputs):
            a, b = node.inputs
            contracted |= {analysis.axis_id(a, model.rank(a) - 1), analysis.axis_id(b, max(model.rank(b) - 2, 0))}
        elif node.op_type == "Add":
            biases |= {i for i, c in zip(node.inputs, constant) if c}
    sources = (set(analysis.tags.get("weight", [])) - set(analysis.tags.get("consumer", []))) | {
        k for k, ref in enumerate(analysis.axes) if ref.tensor in biases
    }
    slabs: dict[int, list[np.ndarray]] = {}
    groups = {g.id: g for g in analysis.groups}
    for gid, units in removed.items():
        for unit in (groups[gid].units[k] for k in units):
            if contracted.intersection(unit.members):
                for axis_id in sources.intersection(unit.members):
                    slabs.setdefault(axis_id, []).append(unit.members[axis_id])
    return _zero_slabs(graph, analysis, {a: np.concatenate(parts) for a, parts in slabs.items()})


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Relative L2 error of all outputs together: ``|a - b| / |a|``."""
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in expected])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in actual])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
