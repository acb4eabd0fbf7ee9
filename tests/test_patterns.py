"""Acceptance for the reference models of models/patterns.py (issue 7): GroupNorm as PyTorch
exports it, torch.chunk at run-time bounds and ShuffleNetV2 units exported with dynamic sizes
analyse with no barrier, prune to ``--flops 0.5`` (valid, same interface, FLOPs ratio <= 0.52) and
are exact."""

from __future__ import annotations

import pytest

from helpers import assert_exact, randomize_weights
from models.patterns import PATTERNS
from spa_compiler import PruneConfig, analyze_graph, load_model, prune
from test_models import _assert_valid_pruned

SHAPES = {"input": (1, 3, 32, 32)}


@pytest.fixture(scope="module")
def exported_pattern(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patterns")
    cache = {}

    def get(name: str, opset: int):
        from models.patterns import export_pattern

        if (name, opset) not in cache:
            cache[(name, opset)] = export_pattern(name, folder / f"{name}_{opset}.onnx", opset)
        return cache[(name, opset)]

    return get


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("opset", [11, 17])
def test_pattern_prunes_to_half_flops(exported_pattern, tmp_path, name, opset):
    source = exported_pattern(name, opset)
    assert analyze_graph(load_model(source, SHAPES)).barriers == []
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.5, bench_runs=0, input_shapes=SHAPES))
    _assert_valid_pruned(source, output, report, SHAPES)
    assert report.flops_ratio >= 0.48


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_is_exact(exported_pattern, name):
    graph = randomize_weights(load_model(exported_pattern(name, 17), SHAPES), seed=3)
    assert_exact(graph, PruneConfig(flops=0.5, round_to=4, verify=False, input_shapes=SHAPES), rtol=1e-4)


def test_group_normalization_operator_from_the_dynamo_exporter(tmp_path):
    """At opset 21 the dynamo exporter writes nn.GroupNorm as GroupNormalization: whole groups go."""
    from models.patterns import export_pattern

    source = export_pattern("groupnorm_tiny", tmp_path / "gn21.onnx", 21, dynamo=True)
    graph = load_model(source)
    assert sum(n.op_type == "GroupNormalization" for n in graph.nodes) == 4
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "pruned.onnx", report)
    assert report.flops_ratio >= 0.48
    assert_exact(randomize_weights(graph, seed=3), PruneConfig(flops=0.5, round_to=4, verify=False), rtol=1e-4)
