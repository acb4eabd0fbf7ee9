"""The built-in criterion passes, installed as ``spa_compiler.passes``: one module per
criterion family, each registering its criteria by name when imported."""

from __future__ import annotations

from . import activation, bn_scale, magnitude, obs, random_score  # noqa: F401  (registration)

__all__ = ["activation", "bn_scale", "magnitude", "obs", "random_score"]
