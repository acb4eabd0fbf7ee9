"""Activation-aware criterion (as Wanda and FLAP score weights): a channel's score is
``Σ |W[r, f]| · ‖X_f‖`` over the weights that read it, ``‖X_f‖ = sqrt(H[f, f])`` the norm of
input feature f over the calibration data. A large weight on a silent input scores low."""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion

from spa_compiler.secondorder import feature_columns

__all__ = ["ActivationAware"]


@register_criterion("activation")
class ActivationAware(Criterion):
    description = "|W| x input activation norm of the consumers (needs --calib, else data-free)"
    needs_statistics = True

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        totals = np.zeros(len(group.units))
        by_axis = group.by_axis()
        for axis_id, stats in ctx.statistics_for(group):
            layer = stats.layer
            weights = np.abs(layer.matrix(ctx.analysis.graph.float_constants[layer.weight]).astype(np.float64))
            norms = np.sqrt(np.maximum(np.diag(stats.hessian)[:-1], 0.0))
            per_feature = (weights * norms).sum(axis=0)
            units, channels = by_axis[axis_id]
            k = layer.features_per_channel
            per_channel = per_feature[feature_columns(channels, k)].reshape(len(channels), k).sum(axis=1)
            totals += np.bincount(units, weights=per_channel, minlength=len(group.units))
        return totals
