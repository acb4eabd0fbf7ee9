"""Re-fit targets that carry the residual stream's error (spa_compiler/residual_target.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler import Pipeline, PruneConfig, PruneState, default_passes, load_model
from spa_compiler.calibrate import ConsumerLayer, consumer_layers
from spa_compiler.paired import PairedStatistics
from spa_compiler.refit import Refit, layer_levels, refit_layer, residual_streams, stages
from spa_compiler.residual_target import residual_stream

pytestmark = pytest.mark.accurate

TOKENS, WIDTH, HIDDEN = 16, 8, 64


def residual_mlp(path, seed: int = 0) -> None:
    """Two residual MLP blocks on ``[batch, 16 tokens, 8]``: ``s = x + W2 relu(W1 x) + b2``, then
    ``s + W4 relu(W3 s) + b4``; the second block's stream is the first block's sum."""
    rng = np.random.default_rng(seed)
    up, down = (WIDTH, HIDDEN), (HIDDEN, WIDTH)
    weights = {
        "W1": rng.standard_normal(up) / np.sqrt(WIDTH), "W2": rng.standard_normal(down) / np.sqrt(HIDDEN),
        "b2": rng.standard_normal(WIDTH) * 0.1,
        "W3": rng.standard_normal(up) / np.sqrt(WIDTH), "W4": rng.standard_normal(down) / np.sqrt(HIDDEN),
        "b4": rng.standard_normal(WIDTH) * 0.1,
    }
    nodes = []
    stream = "x"
    for block, (up, down, bias) in enumerate((("W1", "W2", "b2"), ("W3", "W4", "b4"))):
        nodes += [
            helper.make_node("MatMul", [stream, up], [f"u{block}"], name=f"up{block}"),
            helper.make_node("Relu", [f"u{block}"], [f"h{block}"], name=f"relu{block}"),
            helper.make_node("MatMul", [f"h{block}", down], [f"d{block}"], name=f"down{block}"),
            helper.make_node("Add", [f"d{block}", bias], [f"y{block}"], name=f"bias{block}"),
            helper.make_node("Add", [f"y{block}", stream], [f"s{block}"], name=f"residual{block}"),
        ]
        stream = f"s{block}"
    graph = helper.make_graph(
        nodes, "residual_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info(stream, TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_refit_with_a_residual_error_is_its_least_squares_solution():
    """With the stream's error ``δ`` appended to the original features, the re-fit solves
    ``min ‖X̃ W̃ᵀ − (X Wᵀ + δ)‖²`` (ridge toward the present weights, the bias free)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 6))
    x_pruned = x[:, [0, 2, 3, 4, 5]] + 0.1 * rng.standard_normal((3000, 5))
    error = x_pruned[:, :3] @ rng.standard_normal((3, 4)) + 0.05 * rng.standard_normal((3000, 4))  # δ, partly predictable
    weights = np.hstack([rng.standard_normal((4, 6)), rng.standard_normal((4, 1))])
    layer = ConsumerLayer("n", "MatMul", "x", "W", 0, 1, "B")
    stats = PairedStatistics.empty(layer, 5, 6, residual=4)
    for fold, rows in enumerate((slice(0, 1500), slice(1500, 3000))):
        stats.add(x_pruned[rows], np.hstack([x[rows], error[rows]]), fold)
    matrix, bias, _ = refit_layer(layer, weights, weights, stats, np.array([1]), ridge=0.001)

    design = np.hstack([x_pruned, np.ones((3000, 1))])
    target = x @ weights[:, :6].T + weights[:, 6] + error
    lam = 0.001 * np.mean(np.diag(design.T @ design))
    prior = weights[:, [0, 2, 3, 4, 5]]
    stacked = np.vstack([design, np.sqrt(lam) * np.eye(6)[:5]])
    expected = np.linalg.lstsq(stacked, np.vstack([target, np.sqrt(lam) * prior.T]), rcond=None)[0].T
    np.testing.assert_allclose(matrix[:, [0, 2, 3, 4, 5]], expected[:, :5], rtol=2e-4, atol=2e-5)  # float32 products
    np.testing.assert_allclose(bias, expected[:, 5], rtol=2e-4, atol=2e-5)


def test_layers_feeding_a_residual_stream_are_found(tmp_path):
    path = tmp_path / "mlp.onnx"
    residual_mlp(path)
    graph = load_model(path, {"x": (1, TOKENS, WIDTH)})
    state = Pipeline(default_passes(PruneConfig(flops=0.5))).until("analyse")(PruneState(PruneConfig(flops=0.5), graph=graph))
    layers = {layer.node: layer for layer in consumer_layers(state.analysis)}
    assert {name: residual_stream(graph, layer) for name, layer in layers.items()} == \
        {"up0": None, "down0": "x", "up1": None, "down1": "s0"}
    levels = layer_levels(graph, list(layers.values()))
    assert residual_streams(graph, stages(levels, 4)) == {"down0": "x", "down1": "s0"}
    assert residual_streams(graph, stages(levels, 1)) == {"down0": "x"}  # one stage: s0 is computed by down0 in it


def test_a_fused_add_and_layernorm_is_a_residual_sum(tmp_path):
    """onnxruntime's SkipLayerNormalization sums its first two inputs (and its bias, here the
    projection's) before normalising: the projection feeding it takes the stream's error."""
    rng = np.random.default_rng(0)
    constants = {"W": rng.standard_normal((WIDTH, WIDTH)), "B": rng.standard_normal(WIDTH),
                 "gamma": np.ones(WIDTH), "beta": np.zeros(WIDTH)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="stream"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="projection"),
        helper.make_node("SkipLayerNormalization", ["y", "r", "gamma", "beta", "B"], ["out"], name="skip_norm",
                         domain="com.microsoft", epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in constants.items()],
    )
    path = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), path)
    loaded = load_model(path)
    assert residual_stream(loaded, ConsumerLayer("projection", "MatMul", "r", "W", 0, 1, "B")) == "r"
    assert residual_stream(loaded, ConsumerLayer("projection", "MatMul", "r", "W", 0, 1, None)) == "r"


def test_residual_target_brings_the_blocks_outputs_closer(tmp_path):
    """Pruned to 0.3 of the FLOPs, re-fitted on 128 samples: the second block taking up the
    first block's error leaves the output nearer the original on 128 other samples (relative
    error 0.217 against 0.237)."""
    path = tmp_path / "mlp.onnx"
    residual_mlp(path)
    rng = np.random.default_rng(1)
    samples = rng.standard_normal((256, TOKENS, WIDTH)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=samples[:128])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": samples[128:]})[0]
    errors = {}
    for residual in (False, True):
        config = PruneConfig(flops=0.3, calibration=str(tmp_path / "calib.npz"), round_to=1, bench_runs=0,
                             input_shapes={"x": (1, TOKENS, WIDTH)}, refit_residual=residual)
        passes = [Refit(samples=128, residual=residual) if p.name == "refit" else p for p in default_passes(config)]
        assert [p.residual for p in default_passes(config) if p.name == "refit"] == [residual]
        state = Pipeline(passes)(PruneState(config, graph=load_model(path, config.input_shapes)))
        pruned = ort.InferenceSession(state.model.SerializeToString(), providers=["CPUExecutionProvider"])
        after = np.concatenate([pruned.run(None, {"x": samples[i:i + 1]})[0] for i in range(128, 256)])
        errors[residual] = float(np.linalg.norm(after - reference) / np.linalg.norm(reference))
    assert errors[True] < 0.95 * errors[False], errors
