"""Shared fixtures: reference models exported once per session (with PyTorch, imported only
by the tests that use them, so the pure-ONNX tests run without it)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name, opset=17) -> Path``: a models/ architecture exported to ONNX (cached)."""
    folder = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, int], Path] = {}

    def get(name: str, opset: int = 17) -> Path:
        from models.export import export_architecture

        if (name, opset) not in cache:
            cache[(name, opset)] = export_architecture(name, folder / f"{name}_{opset}.onnx", opset=opset)
        return cache[(name, opset)]

    return get
