"""Random criterion: a seeded baseline (``--seed``) every other criterion should beat."""

from __future__ import annotations

import numpy as np

from spa_compiler.analysis import Group
from spa_compiler.criteria import Criterion, ScoreContext, register_criterion

__all__ = ["RandomScore"]


@register_criterion("random")
class RandomScore(Criterion):
    description = "uniform random scores from the seeded generator (a baseline)"

    def score(self, group: Group, ctx: ScoreContext) -> np.ndarray:
        return ctx.rng.random(len(group.units))
