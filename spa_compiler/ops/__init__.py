"""Op rules. Importing this package registers every built-in rule."""

from __future__ import annotations

from . import control, elementwise, layout, linear, norm, quantized, recurrent, reshape, spatial  # noqa: F401  (registration)
from . import fused_attention, fused_norm  # noqa: F401  (registration)
from .registry import (
    Coupler,
    OpRule,
    Rewriter,
    Unsupported,
    WeightView,
    get_rule,
    register_op,
    registered_ops,
)

__all__ = [
    "Coupler",
    "OpRule",
    "Rewriter",
    "Unsupported",
    "WeightView",
    "get_rule",
    "register_op",
    "registered_ops",
]
