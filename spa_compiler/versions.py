"""spa-prune's version (the package metadata reads it from here) and those of what it computes with."""

from __future__ import annotations

import platform

__all__ = ["__version__", "versions", "versions_line"]

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """spa-prune's version and onnx's, onnxruntime's, NumPy's and Python's: what a report was
    made with, for bug reports and pinning."""
    import numpy
    import onnx
    import onnxruntime

    return {"spa-prune": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def versions_line() -> str:
    """:func:`versions` in one line: ``spa-prune 0.1.0 (onnx 1.23.2, onnxruntime 1.32.0, ...)``."""
    named = {"onnx": "onnx", "onnxruntime": "onnxruntime", "numpy": "numpy", "python": "Python"}
    found = versions()
    return f"spa-prune {found['spa-prune']} (" + ", ".join(f"{shown} {found[key]}" for key, shown in named.items()) + ")"
