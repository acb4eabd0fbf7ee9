"""``--reinit``: the pruned architecture with PyTorch's default initialisation, for training from scratch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from spa_compiler import PruneConfig, prune


def _initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _prune_twice(source, tmp_path, **options):
    pruned, fresh = tmp_path / "pruned.onnx", tmp_path / "fresh.onnx"
    prune(source, pruned, PruneConfig(flops=0.5, bench_runs=0, **options))
    prune(source, fresh, PruneConfig(flops=0.5, bench_runs=0, reinit=True, **options))
    return onnx.load(str(pruned)), _initializers(pruned), _initializers(fresh)


def test_reinit_keeps_the_architecture_and_draws_kaiming_uniform_weights(exported, tmp_path):
    model, pruned, fresh = _prune_twice(exported("densenet_tiny"), tmp_path)
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in pruned.items()}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for node in convs:
        weight = fresh[node.input[1]]
        bound = 1 / np.sqrt(np.prod(weight.shape[1:]))
        assert np.abs(weight).max() <= bound
        assert not np.allclose(weight, pruned[node.input[1]])
        if weight.size >= 1000:  # a uniform's standard deviation is bound / sqrt(3)
            assert abs(weight.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert norms
    for node in norms:
        for name, fill in zip(node.input[1:5], (1.0, 0.0, 0.0, 1.0)):
            np.testing.assert_array_equal(fresh[name], np.full_like(pruned[name], fill))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bound = 1 / np.sqrt(fresh[gemm.input[1]].shape[1])  # transB=1: [out, in]
    assert np.abs(fresh[gemm.input[2]]).max() <= bound and np.abs(fresh[gemm.input[2]]).max() > bound / 2


def test_reinit_leaves_non_weights_and_is_seeded(exported, tmp_path):
    model, pruned, fresh = _prune_twice(exported("unet_tiny"), tmp_path)
    resize_scales = [n.input[2] for n in model.graph.node if n.op_type == "Resize" and n.input[2] in pruned]
    assert resize_scales
    for name in resize_scales:
        np.testing.assert_array_equal(fresh[name], pruned[name])
    again = tmp_path / "again.onnx"
    prune(exported("unet_tiny"), again, PruneConfig(flops=0.5, bench_runs=0, reinit=True))
    assert again.read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
