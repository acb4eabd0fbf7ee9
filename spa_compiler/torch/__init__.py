"""Back to PyTorch: fine-tune a pruned model, narrow the user's own module, or train from scratch.

Needs the optional extra ``pip install 'spa-prune[torch]'`` (torch and onnx2torch); pruning itself
never imports this package.

- :func:`to_torch` turns any ONNX model (pruned or not, from any framework) into a trainable module.
- :func:`narrow` applies a pruning report to the ``nn.Module`` the ONNX file was exported from.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError("spa_compiler.torch needs PyTorch: pip install 'spa-prune[torch]'") from exc

from .convert import to_torch
from .narrowing import narrow

__all__ = ["narrow", "to_torch"]
