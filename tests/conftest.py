"""Shared fixtures: reference models exported once per session (with PyTorch, imported only
by the tests that use them, so the pure-ONNX tests run without it), and the fast pipeline.

Most tests check structure (couplings, rewrites, errors, files), not accuracy, so they prune
with the fast pipeline: L2 ranking, allocation by scores, no re-fit; the accurate default
pipeline (obs, measured sensitivity, sequential re-fit) costs seconds per model. Tests of the
default pipeline itself are marked ``accurate`` and see the real defaults.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README runs the suite on two workers (``-n 2``), one per core: each runs numpy's and
    # PyTorch's kernels on one thread (set before either is imported), instead of both workers
    # starting a thread per core (10.5 minutes on two cores, against 17 in one process).
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import dataclasses
from pathlib import Path

import pytest

from spa_compiler import PruneConfig

FAST = {"criterion": "l2", "allocation": "score", "refit_rounds": 0}


@pytest.fixture(autouse=True)
def fast_pipeline(request, monkeypatch):
    """Unless the test is marked ``accurate``, PruneConfig's defaults are the fast pipeline's."""
    if request.node.get_closest_marker("accurate"):
        return
    fields = [f.name for f in dataclasses.fields(PruneConfig)]
    defaults = list(PruneConfig.__init__.__defaults__)
    for name, value in FAST.items():
        defaults[fields.index(name)] = value
    monkeypatch.setattr(PruneConfig.__init__, "__defaults__", tuple(defaults))


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
