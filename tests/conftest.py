"""Shared fixtures: reference models exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.export import export_architecture


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(name, opset=17) -> Path``: a models/ architecture exported to ONNX (cached)."""
    folder = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, int], Path] = {}

    def get(name: str, opset: int = 17) -> Path:
        if (name, opset) not in cache:
            cache[(name, opset)] = export_architecture(name, folder / f"{name}_{opset}.onnx", opset=opset)
        return cache[(name, opset)]

    return get
