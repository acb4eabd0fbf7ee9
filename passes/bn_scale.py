"""BatchNorm scale criterion (network slimming): a channel's score is ``|gamma|`` of the
BatchNorm that normalises it. Groups without a BatchNorm (exporters often fold BN into the
convolution) fall back to the L2 magnitude of their weights."""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion

from .magnitude import L2Magnitude

__all__ = ["BNScale"]


@register_criterion("bn_scale")
class BNScale(Criterion):
    description = "|gamma| of the channel's BatchNorm (L2 magnitude where there is none)"

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        if not ctx.has_tag(group, "bn_scale"):
            return L2Magnitude().score(group, ctx)
        return ctx.per_unit(group, "bn_scale", lambda slabs: np.abs(slabs).sum(axis=1))
