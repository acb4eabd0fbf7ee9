"""Criterion passes: each module registers one or more criteria by name.

They reach the compiler through the ``spa_prune.criteria`` entry points declared in
``pyproject.toml``; importing this package registers them directly as well.
"""

from __future__ import annotations

from . import activation, bn_scale, magnitude, obs, random_score  # noqa: F401  (registration)

__all__ = ["activation", "bn_scale", "magnitude", "obs", "random_score"]
