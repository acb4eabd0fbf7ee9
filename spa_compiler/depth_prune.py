"""The depth pass: remove whole residual branches (:mod:`spa_compiler.depth`) before width pruning.

Each removable branch is scored by the output distortion its removal causes on calibration (or
synthetic) samples, as the sensitivity pass measures groups::

    D(branch) = Σ_outputs ‖Y(without branch) − Y‖² / Σ_outputs ‖Y‖²

One onnxruntime session serves every measurement: each branch's output is multiplied by a scalar
gate fed as a graph input (1 keeps it, 0 removes it). Branches leave in the order of distortion
per unit of cost they save (MACs for ``--flops``, parameters for ``--params``), never two nested
in one another. ``--depth N`` removes N of them and width pruning meets the rest of the target;
``--units depth`` removes branches until the target is met and prunes no width.

The target stays relative to the original model: width allocation is asked for
``target / kept``, ``kept`` the share of the cost the removed branches left.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .allocate import Plan
from .analysis import Analysis, analyze_graph
from .batch_axis import exact_batch
from .sample_layout import run_samples
from .calibrate import load_calibration
from .cost import CostModel, node_macs
from .depth import Branch, find_branches, gate_branches, gate_name, remove_branches
from .errors import TargetError
from .ir import Graph, load_model
from .model_files import save_model
from .pipeline import Pass
from .self_written import written_once
from .sensitivity import samples_for
from .state import PruneState
from .synthetic import synthetic_calibration
from .verify import session_for

__all__ = ["DepthResult", "PruneDepth", "KeepWidths", "branch_distortions", "choose_branches"]

log = logging.getLogger(__name__)


@dataclass
class DepthResult:
    """What the depth pass removed: the branches (descriptions), each one's measured distortion,
    the original graph and its cost, and the share of the cost the removed branches left."""

    original: Graph
    cost_before: dict[str, float]
    kept: float
    removed: list[str] = field(default_factory=list)
    distortions: list[float] = field(default_factory=list)


def branch_distortions(graph: Graph, branches: list[Branch], data: dict[str, np.ndarray]) -> np.ndarray:
    """``D`` of each branch removed alone (see the module docstring) on ``data`` (first axis samples)."""
    session = session_for(gate_branches(graph, branches))
    count = len(next(iter(data.values())))
    batch = exact_batch(graph) or count  # as the re-fit's runs

    def outputs(removed: Branch | None) -> list[np.ndarray]:
        gates = {gate_name(b): np.asarray(0 if b is removed else 1, _numpy_dtype(graph, b)) for b in branches}
        runs = [run_samples(session, None, graph, {k: v[i:i + batch] for k, v in data.items()}, batch, gates)
                for i in range(0, count, batch)]
        return [np.concatenate(parts).astype(np.float64) for parts in zip(*runs)]

    reference = outputs(None)
    energy = sum(float(np.sum(y * y)) for y in reference) or 1.0
    return np.array([sum(float(np.sum((a - b) ** 2)) for a, b in zip(outputs(branch), reference)) / energy
                     for branch in branches])


def _numpy_dtype(graph: Graph, branch: Branch) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[branch.exit]))


def _branch_costs(graph: Graph, analysis: Analysis, branches: list[Branch], kind: str) -> np.ndarray:
    """The cost removing each branch saves: its nodes' MACs, or the weights only it reads."""
    if kind == "flops":
        macs = node_macs(analysis)
        return np.array([sum(macs.get(n, 0.0) for n in b.nodes) for b in branches])
    costs = []
    for branch in branches:
        owned = {i for n in branch.nodes for i in graph.node_by_name[n].inputs if graph.is_constant(i)}
        costs.append(float(sum(graph.constants[name].size for name in owned
                               if all(c.name in branch.nodes for c in graph.consumers.get(name, [])))))
    return np.array(costs)


def _overlap(a: Branch, b: Branch) -> bool:
    """Whether removing both is not removing each: they share nodes or a join, or one holds the other."""
    return bool(a.nodes & b.nodes) or a.join == b.join or a.join in b.nodes or b.join in a.nodes


def choose_branches(branches: list[Branch], distortions: np.ndarray, costs: np.ndarray,
                    count: int | None, budget: float) -> list[int]:
    """Branches in the order of distortion per cost saved, skipping one that overlaps a chosen one;
    ``count`` of them, or (``count`` None) until the saved cost reaches ``budget``."""
    order = sorted(range(len(branches)), key=lambda k: (distortions[k] / max(costs[k], 1e-30), k))
    chosen: list[int] = []
    saved = 0.0
    for k in order:
        if (count is not None and len(chosen) >= count) or (count is None and saved >= budget):
            break
        if any(_overlap(branches[k], branches[j]) for j in chosen):
            continue
        chosen.append(k)
        saved += costs[k]
    return chosen


class PruneDepth(Pass):
    """Remove residual branches (see the module docstring); the width passes then prune the rest."""

    name, description = "depth", "scoring and removing residual branches"
    requires, provides = ("graph",), ("depth",)

    def __init__(self, count: int | None) -> None:
        self.count = count

    def run(self, state: PruneState) -> PruneState:
        config, graph = state.config, state.graph
        kind = config.target().kind
        if kind not in ("flops", "params"):
            raise TargetError(f"depth units take a --flops or --params target, not --{kind}")
        branches = find_branches(graph)
        if not branches:
            raise TargetError("the model has no removable residual branch (a fork whose join is a residual Add)")
        available = max(1, config.samples_for())
        analysis = analyze_graph(graph)
        data = (load_calibration(config.calibration, graph, available) if config.calibration
                else self._data_free(state, analysis, available))
        per_sample = sum(int(np.prod(graph.shapes[n][1:])) for n in graph.outputs if n in graph.shapes)
        samples = samples_for(per_sample, len(next(iter(data.values()))))
        state.note(f"measuring {len(branches)} residual branches on {samples} samples")
        distortions = branch_distortions(graph, branches, {k: v[:samples] for k, v in data.items()})
        cost_before = {k: CostModel(analysis, k).original_total for k in ("flops", "params")}
        budget = (1.0 - config.target().value) * cost_before[kind]
        costs = _branch_costs(graph, analysis, branches, kind)
        chosen = choose_branches(branches, distortions, costs, self.count, budget)
        removed = [branches[k] for k in chosen]
        pruned = _reloaded(remove_branches(graph, removed), graph)
        kept = CostModel(analyze_graph(pruned), kind).original_total / cost_before[kind]
        state.depth = DepthResult(
            graph, cost_before, kept, [b.describe(graph) for b in removed], [float(distortions[k]) for k in chosen],
        )
        log.info("depth: removed %d of %d branches, %.3f of the %s left", len(removed), len(branches), state.depth.kept, kind)
        state.graph = pruned
        return state


    @staticmethod
    def _data_free(state: PruneState, analysis: Analysis, samples: int) -> dict[str, np.ndarray]:
        """Synthetic samples, a causal language model's rewritten into text of its own, the
        text the statistics then use (:func:`~spa_compiler.self_written.written_once`)."""
        data = synthetic_calibration(state.graph, samples, state.config.seed)[0]
        written = written_once(state, analysis, data)
        return data if written.data is None else written.data


def _reloaded(model: onnx.ModelProto, graph: Graph) -> Graph:
    """The rewritten model loaded as a graph at the original's bound input shapes (held in
    memory: models over 2 GB are not depth-pruned)."""
    with tempfile.TemporaryDirectory() as folder:
        reloaded = load_model(save_model(model, Path(folder) / "depth.onnx"), graph.input_shapes)
    reloaded.source, reloaded.uses_external_data = graph.source, graph.uses_external_data
    return reloaded


class KeepWidths(Pass):
    """The empty width plan (``--units depth``: branches alone meet the target)."""

    name, description = "allocate", "keeping every width"
    requires, provides = ("analysis",), ("plan", "removed_by_axis")

    def run(self, state: PruneState) -> PruneState:
        state.plan, state.removed_by_axis = Plan(achieved=1.0), {}
        return state
