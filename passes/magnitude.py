"""Magnitude criteria: a channel's score is the norm of every weight slab it owns.

A unit owns slabs on each tagged weight axis of its group: the output filter of the convolution
that writes it (``W[o, :, :, :]``) and the input slices of the layers that read it
(``W'[:, i, :, :]``). L1 scores ``sum |w|`` over all of them, L2 ``sqrt(sum w^2)``.
"""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion

__all__ = ["L1Magnitude", "L2Magnitude"]


@register_criterion("l1")
class L1Magnitude(Criterion):
    description = "sum of |w| over the weights a channel owns (producers and consumers)"

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        return ctx.per_unit(group, "weight", lambda slabs: np.abs(slabs).sum(axis=1))


@register_criterion("l2")
class L2Magnitude(Criterion):
    description = "Euclidean norm of the weights a channel owns (producers and consumers)"

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        return np.sqrt(ctx.per_unit(group, "weight", lambda slabs: np.square(slabs).sum(axis=1)))
