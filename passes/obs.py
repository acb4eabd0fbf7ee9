"""The second-order (Optimal Brain Surgeon) criterion: score channels by the output error their
removal causes once the remaining weights are compensated, and compensate them (the maths:
:mod:`spa_compiler.secondorder`). A channel's score is its cost
summed over every consumer: squared output error in the consumers' own units, which compares
across groups as it is (``self_normalized``). Dividing each layer's costs by its output energy
``trace(W H Wᵀ)`` (``obs_relative``) was measured worse: digits ResNet at 0.3 of the FLOPs 0.856
test accuracy against 0.936, MiniLM at 0.5 sentence-embedding cosine 0.741 against 0.749
(``python -m models.obs_benchmark``). Channels are scored one at a time; compensation removes
all chosen channels of a layer jointly, which is exact for the joint removal. ``obs_joint``
chooses them jointly instead, a block at a time with the inverse Hessian downdated between
blocks (:func:`~spa_compiler.secondorder.greedy_scores`, as OBC and ZipLM do).
"""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion
from spa_compiler.pipeline import Pass
from spa_compiler.secondorder import Consumer, compensate_layer, compensation_system, greedy_scores, removal_costs
from spa_compiler.state import PruneState

from .magnitude import L2Magnitude

__all__ = ["OBS", "OBSRelative", "OBSJoint", "OBSCompensation"]


class OBSCompensation(Pass):
    """After allocation, re-fit every consumer layer that lost input channels:
    ``W ← W − W[:, B] ((H⁻¹)_BB)⁻¹ (H⁻¹)[B, :]`` with the bias as the constant feature."""

    name, description = "compensate", "re-fitting the remaining weights (least squares)"
    requires, provides = ("analysis", "statistics", "removed_by_axis"), ("compensated",)

    def run(self, state: PruneState) -> PruneState:
        for stats in state.statistics.values():
            axis = state.analysis.axis_id(stats.layer.weight, stats.layer.axis)
            channels = state.removed_by_axis.get(axis)
            if channels is not None and len(channels):
                state.compensated.update(compensate_layer(stats, state.analysis.graph.float_constants, channels))
        return state


@register_criterion("obs")
class OBS(Criterion):
    description = "second-order output error after compensation (needs --calib, else data-free)"
    needs_statistics = True
    self_normalized = True
    fallback = L2Magnitude
    compensation = OBSCompensation
    relative = False  # divide each layer's costs by its output energy (the obs_relative ablation)
    joint = False  # choose a group's channels jointly (obs_joint)
    alternative = "obs_joint"

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        if self.joint:
            return self._joint_score(group, ctx)
        totals = np.zeros(len(group.units))
        by_axis = group.by_axis()
        for axis_id, stats in ctx.statistics_for(group):
            layer = stats.layer
            weights, inverse = compensation_system(stats, ctx.analysis.graph.float_constants)
            features = weights.shape[1]  # with the constant feature when the layer has a bias
            hessian = stats.hessian[:features, :features]
            energy = (float(np.sum((weights @ hessian) * weights)) or 1.0) if self.relative else 1.0
            units, channels = by_axis[axis_id]
            costs = removal_costs(weights, inverse, channels, layer.features_per_channel)
            totals += np.bincount(units, weights=costs / energy, minlength=len(group.units))
        return totals

    @staticmethod
    def _joint_score(group: Group, ctx: ScoreContext) -> np.ndarray:
        by_axis = group.by_axis()
        consumers = []
        for axis_id, stats in ctx.statistics_for(group):
            units, channels = by_axis[axis_id]
            weights, inverse = compensation_system(stats, ctx.analysis.graph.float_constants)
            consumers.append(Consumer(weights, inverse, np.asarray(units), np.asarray(channels),
                                      stats.layer.features_per_channel))
        return greedy_scores(consumers, len(group.units), group.prunable)


@register_criterion("obs_relative")
class OBSRelative(OBS):
    """Ablation: each layer's costs relative to its output energy ``trace(W H Wᵀ)``."""

    description = "obs with costs relative to each layer's output energy (ablation)"
    relative = True
    alternative = None


@register_criterion("obs_joint")
class OBSJoint(OBS):
    """A group's channels chosen jointly: removed a block at a time, each block's costs given
    the channels already removed and the weights compensated for them."""

    description = "obs choosing each group's channels jointly, inverse Hessian updated as they go"
    joint = True
    alternative = "obs"
