"""The second-order pass: its maths against numpy, im2col against onnxruntime, and the pipeline
with calibration data and data-free."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from rich.console import Console

import spa_compiler.secondorder as obs
from spa_compiler import InputError, PruneConfig, load_model, prune, prune_graph, synthetic_inputs
from spa_compiler.calibrate import cast_exactly, load_calibration, read_arrays, sameness
from spa_compiler.feature_rows import conv_patches
from spa_compiler.report import render_report
from spa_compiler.synthetic import synthetic_calibration
from spa_compiler.verify import run_model
from helpers import relative_error


def _design(rng, samples=200, features=6):
    x = rng.standard_normal((samples, features))
    return x, np.hstack([x, np.ones((samples, 1))])


def test_compensation_is_the_least_squares_solution():
    """Removing features B and compensating gives, on the remaining features and the bias, the
    least-squares fit of the original outputs on the calibration activations."""
    rng = np.random.default_rng(0)
    x, augmented_x = _design(rng)
    weights = rng.standard_normal((4, 7))  # 6 features + bias
    hessian = augmented_x.T @ augmented_x
    removed = np.array([1, 4])
    result = obs.compensated(weights, np.linalg.inv(hessian), removed)
    np.testing.assert_allclose(result[:, removed], 0, atol=1e-12)
    kept = np.setdiff1d(np.arange(7), removed)
    expected, *_ = np.linalg.lstsq(augmented_x[:, kept], augmented_x @ weights.T, rcond=None)
    np.testing.assert_allclose(result[:, kept], expected.T, atol=1e-5)


@pytest.mark.parametrize("per_channel", [1, 2, 3])
def test_removal_cost_is_the_increase_of_squared_error(per_channel):
    """One feature per channel (the closed form) and blocks of features (a solve per channel)."""
    rng = np.random.default_rng(1)
    x, augmented_x = _design(rng)
    weights = rng.standard_normal((3, 7))
    inverse = np.linalg.inv(augmented_x.T @ augmented_x)
    channels = np.arange(6 // per_channel)
    costs = obs.removal_costs(weights, inverse, channels, per_channel)
    for channel in channels:
        result = obs.compensated(weights, inverse, obs.feature_columns(np.array([channel]), per_channel))
        error = np.sum((augmented_x @ weights.T - augmented_x @ result.T) ** 2)
        assert costs[channel] == pytest.approx(error, rel=1e-6)


def _least_squares_error(augmented_x, weights, removed) -> float:
    """The squared output error of re-fitting ``weights`` without the ``removed`` features."""
    kept = np.setdiff1d(np.arange(augmented_x.shape[1]), removed)
    target = augmented_x @ weights.T
    fit, *_ = np.linalg.lstsq(augmented_x[:, kept], target, rcond=None)
    return float(np.sum((target - augmented_x[:, kept] @ fit) ** 2))


def _consumer(weights, augmented_x, channels=6):
    return obs.Consumer(weights.copy(), np.linalg.inv(augmented_x.T @ augmented_x), np.arange(channels),
                        np.arange(channels), 1)


def test_greedy_scores_rise_by_the_exact_marginal_costs():
    """One unit per block: each score is what removing it adds to the least-squares error of
    removing the units before it (running maximum): exact marginal costs."""
    rng = np.random.default_rng(2)
    x, augmented_x = _design(rng, features=6)
    weights = rng.standard_normal((3, 7))
    scores = obs.greedy_scores([_consumer(weights, augmented_x)], 6, list(range(6)), steps=5)
    order = np.argsort(scores, kind="stable")
    removed = order[: int(obs.GREEDY_SHARE * 6)]
    assert len(removed) == 5
    errors = [_least_squares_error(augmented_x, weights, removed[:k]) for k in range(len(removed) + 1)]
    np.testing.assert_allclose(scores[removed], np.maximum.accumulate(np.diff(errors)), rtol=1e-6)


def test_greedy_without_downdates_keeps_the_one_at_a_time_order(monkeypatch):
    """A consumer too wide to downdate keeps its first costs: the order is obs's."""
    monkeypatch.setattr(obs, "GREEDY_MAX_FEATURES", 0)
    rng = np.random.default_rng(5)
    x, augmented_x = _design(rng, features=6)
    weights = rng.standard_normal((3, 7))
    single = obs.removal_costs(weights, np.linalg.inv(augmented_x.T @ augmented_x), np.arange(6), 1)
    scores = obs.greedy_scores([_consumer(weights, augmented_x)], 6, list(range(6)), steps=5)
    assert np.argsort(scores).tolist() == np.argsort(single).tolist()
    removed = np.argsort(single)[:5]
    np.testing.assert_allclose(scores[removed], single[removed], rtol=1e-12)


def test_greedy_keeps_one_of_two_alike_channels():
    """Channels 0 and 1 are nearly the same feature: one at a time each looks free (the other
    stands in), so both go; jointly one of them stays, and the joint removal of three channels
    costs less than a fifth of the one-at-a-time choice (0.18)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 6)) * np.array([3.0, 3.0, 1.0, 1.0, 1.2, 1.5])
    x[:, 1] = x[:, 0] + 0.01 * rng.standard_normal(400)
    augmented_x = np.hstack([x, np.ones((400, 1))])
    weights = np.hstack([rng.standard_normal((3, 6)) + 2.0, np.zeros((3, 1))])
    single = obs.removal_costs(weights, np.linalg.inv(augmented_x.T @ augmented_x), np.arange(6), 1)
    one_at_a_time = np.argsort(single)[:3]
    assert {0, 1} <= set(one_at_a_time.tolist())
    joint = np.argsort(obs.greedy_scores([_consumer(weights, augmented_x)], 6, list(range(6)), steps=64))[:3]
    assert len({0, 1} & set(joint.tolist())) == 1
    assert _least_squares_error(augmented_x, weights, joint) < 0.2 * _least_squares_error(augmented_x, weights, one_at_a_time)


def _two_layer_model(path, combination: bool, inputs: int = 4):
    """x[N,inputs] -> MatMul W1 (inputs->8) -> MatMul W2 (8->3) -> y; hidden channel 7 = channel 0 + 1."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {inputs}] x) => (float[N, 3] y) {{
            h = MatMul (x, W1)
            y = MatMul (h, W2)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((inputs, 8))
    if combination:
        w1[:, 7] = w1[:, 0] + w1[:, 1]
    w2 = rng.standard_normal((8, 3))
    model.graph.initializer.extend([onnx.numpy_helper.from_array(w1.astype(np.float32), "W1"),
                                    onnx.numpy_helper.from_array(w2.astype(np.float32), "W2")])
    onnx.save(model, path)
    return path


def test_a_channel_that_is_a_linear_combination_is_removed_with_no_error(tmp_path, monkeypatch):
    """Eight inputs, so that the hidden channels span seven dimensions: only 0, 1 or 7 leaves
    with no error."""
    monkeypatch.setattr(obs, "DAMPING", 1e-9)
    source = _two_layer_model(tmp_path / "m.onnx", combination=True, inputs=8)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32))
    graph = load_model(source, {"x": (1, 8)})
    result = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="obs",
                                            calibration=str(tmp_path / "calib.npz")))
    hidden = result.analysis.axis_id("W1", 1)
    assert result.removed_by_axis[hidden].tolist()[0] in (0, 1, 7)
    fresh = {"x": rng.standard_normal((32, 8)).astype(np.float32)}
    assert relative_error(run_model(graph.model, fresh), run_model(result.model, fresh)) < 1e-5
    assert sorted(result.compensated) == ["W2"]


def _features_into_a_recurrent_layer(path, op: str, redundant: str, hidden: int = 4):
    """x[N,5,8] -> MatMul W1 -> Add b1 -> Transpose -> ``op`` (8 -> ``hidden``) -> Y: feature 7
    is features 0 + 1 (``redundant`` "sum") or the constant 2 ("constant"); the hidden units, a
    graph output, stay."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 5, 8] x) => (float[5, 1, N, {hidden}] y) {{
            m = MatMul (x, W1)
            a = Add (m, b1)
            t = Transpose <perm = [1, 0, 2]> (a)
            y = {op} <hidden_size = {hidden}> (t, W, R, B)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(4)
    w1, b1 = rng.standard_normal((8, 8)), 0.1 * rng.standard_normal(8)
    w1[:, 7], b1[7] = (w1[:, 0] + w1[:, 1], b1[0] + b1[1]) if redundant == "sum" else (0.0, 2.0)
    constants = {"W1": w1, "b1": b1, "W": 0.5 * rng.standard_normal((1, gates * hidden, 8)),
                 "R": 0.5 * rng.standard_normal((1, gates * hidden, hidden)),
                 "B": 0.5 * rng.standard_normal((1, 2 * gates * hidden))}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items())
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("redundant, removable", [("sum", {0, 1, 7}), ("constant", {7})])
@pytest.mark.parametrize("op, gates", [("RNN", 1), ("GRU", 3), ("LSTM", 4)])
def test_a_recurrent_layer_reading_pruned_features_is_compensated_exactly(tmp_path, monkeypatch, op, gates,
                                                                          redundant, removable):
    """Feature 7 is the sum of features 0 and 1, or a constant: removing one of the three, or the
    constant, leaves the gates unchanged once the input weights take it up, or the input half of
    the bias (``B[:, :G H]``; the recurrence's half stays as it was)."""
    monkeypatch.setattr(obs, "DAMPING", 1e-9)
    source = _features_into_a_recurrent_layer(tmp_path / "m.onnx", op, redundant)
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 5, 8)).astype(np.float32))
    graph = load_model(source, {"x": (1, 5, 8)})
    result = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="obs", refit_rounds=0,
                                            calibration=str(tmp_path / "calib.npz")))
    removed = set(result.removed_by_axis[result.analysis.axis_id("W1", 1)].tolist())
    assert len(removed) == 1 and removed <= removable
    assert sorted(result.compensated) == ["B", "W"]
    assert np.array_equal(result.compensated["B"][:, gates * 4:], graph.constants["B"][:, gates * 4:])
    fresh = {"x": rng.standard_normal((16, 5, 8)).astype(np.float32)}
    assert relative_error(run_model(graph.model, fresh), run_model(result.model, fresh)) < 1e-5
    uncompensated = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="l2"))
    assert relative_error(run_model(graph.model, fresh), run_model(uncompensated.model, fresh)) > 0.05


def _features_into_a_transposed_convolution(path, kernel: int, stride: int, pads: int):
    """x[N,8,6,6] -> Conv 1x1 (8 -> 8) -> ConvTranspose (8 -> 3, ``kernel``, ``stride``, ``pads``)
    -> y: feature 7 is features 0 + 1."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8, 6, 6] x) => (float[N, 3, H, W] y) {{
            a = Conv (x, W1, b1)
            y = ConvTranspose <strides = [{stride}, {stride}], pads = [{pads}, {pads}, {pads}, {pads}]> (a, W, B)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(6)
    w1, b1 = rng.standard_normal((8, 8, 1, 1)), 0.1 * rng.standard_normal(8)
    w1[7], b1[7] = w1[0] + w1[1], b1[0] + b1[1]
    constants = {"W1": w1, "b1": b1, "W": 0.5 * rng.standard_normal((8, 3, kernel, kernel)), "B": rng.standard_normal(3)}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items())
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kernel, stride, pads", [(2, 2, 0), (3, 2, 1)])
def test_a_transposed_convolution_reading_pruned_features_is_compensated_exactly(tmp_path, monkeypatch, kernel,
                                                                                 stride, pads):
    """Feature 7 is the sum of features 0 and 1: removing one of the three leaves the output
    unchanged once the transposed convolution's weights (every kernel position's) take it up.
    Overlapping kernel positions (3 at stride 2) change nothing: each position's share is exact
    on its own. Its bias, added once to every output, is left as it is."""
    monkeypatch.setattr(obs, "DAMPING", 1e-9)
    source = _features_into_a_transposed_convolution(tmp_path / "m.onnx", kernel, stride, pads)
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8, 6, 6)).astype(np.float32))
    graph = load_model(source, {"x": (1, 8, 6, 6)})
    result = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="obs", refit_rounds=0,
                                            calibration=str(tmp_path / "calib.npz")))
    removed = set(result.removed_by_axis[result.analysis.axis_id("W1", 0)].tolist())
    assert len(removed) == 1 and removed <= {0, 1, 7}
    assert sorted(result.compensated) == ["W"]
    fresh = {"x": rng.standard_normal((8, 8, 6, 6)).astype(np.float32)}
    assert relative_error(run_model(graph.model, fresh), run_model(result.model, fresh)) < 1e-5
    uncompensated = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="l2"))
    assert relative_error(run_model(graph.model, fresh), run_model(uncompensated.model, fresh)) > 0.05


@pytest.mark.parametrize("criterion", ["obs", "obs_joint", "obs_relative"])
def test_every_second_order_criterion_scores_a_layer_without_a_bias(tmp_path, monkeypatch, criterion):
    """The transposed convolution has no bias: each criterion scores it over its features alone
    and removes one of the three features that carry a sum, which compensation makes free."""
    monkeypatch.setattr(obs, "DAMPING", 1e-9)
    source = _features_into_a_transposed_convolution(tmp_path / "m.onnx", 2, 2, 0)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(8).standard_normal((16, 8, 6, 6)).astype(np.float32))
    graph = load_model(source, {"x": (1, 8, 6, 6)})
    result = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion=criterion,
                                            refit_rounds=0, calibration=str(tmp_path / "calib.npz")))
    assert set(result.removed_by_axis[result.analysis.axis_id("W1", 0)].tolist()) <= {0, 1, 7}


def test_without_compensation_the_same_removal_loses_accuracy(tmp_path):
    source = _two_layer_model(tmp_path / "m.onnx", combination=True)
    rng = np.random.default_rng(3)
    graph = load_model(source, {"x": (1, 4)})
    result = prune_graph(graph, PruneConfig(ratio=0.125, round_to=1, min_keep=0.0, criterion="l2"))
    fresh = {"x": rng.standard_normal((32, 4)).astype(np.float32)}
    assert relative_error(run_model(graph.model, fresh), run_model(result.model, fresh)) > 0.05


def test_obs_joint_keeps_one_of_two_alike_hidden_channels(tmp_path):
    """x[N,6] -> MatMul W1 -> Relu -> MatMul W2 -> y with hidden channels 0 and 1 the same: ``obs``
    removes both (each looks free while the other stays), ``obs_joint`` one of them, and its
    output error on fresh inputs is under a third of obs's."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6] x) => (float[N, 3] y) {
            h = MatMul (x, W1)
            r = Relu (h)
            y = MatMul (r, W2)
        }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((6, 6))
    w1[:, 0] *= 3.0
    w1[:, 1] = w1[:, 0]
    w2 = rng.standard_normal((6, 3))
    model.graph.initializer.extend([onnx.numpy_helper.from_array(w1.astype(np.float32), "W1"),
                                    onnx.numpy_helper.from_array(w2.astype(np.float32), "W2")])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((256, 6)).astype(np.float32))
    graph = load_model(tmp_path / "m.onnx", {"x": (1, 6)})
    fresh = {"x": rng.standard_normal((64, 6)).astype(np.float32)}
    errors = {}
    for criterion in ("obs", "obs_joint"):
        result = prune_graph(graph, PruneConfig(ratio=2 / 6, round_to=1, min_keep=0.0, criterion=criterion,
                                                calibration=str(tmp_path / "calib.npz"), refit_rounds=0))
        removed = set(result.removed_by_axis[result.analysis.axis_id("W1", 1)].tolist())
        assert len(removed & {0, 1}) == (2 if criterion == "obs" else 1)
        errors[criterion] = relative_error(run_model(graph.model, fresh), run_model(result.model, fresh))
    assert errors["obs_joint"] < 0.4 * errors["obs"]  # 0.097 against 0.316


@pytest.mark.parametrize("attrs", [
    "strides = [1, 1], pads = [1, 1, 1, 1]",
    "strides = [2, 2], pads = [0, 1, 1, 0]",
    "strides = [1, 2], dilations = [2, 2], pads = [2, 2, 2, 2]",
    'strides = [2, 2], auto_pad = "SAME_UPPER"',
])
def test_im2col_rows_reproduce_the_conv_in_onnxruntime(tmp_path, attrs):
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 9, 10] x) => (float[2, 5, ?, ?] y) {{
            y = Conv <{attrs}> (x, W, B)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((5, 3, 3, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(b, "B")])
    onnx.save(model, tmp_path / "conv.onnx")
    graph = load_model(tmp_path / "conv.onnx")
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    (y,) = run_model(graph.model, {"x": x})
    rows = conv_patches(x.astype(np.float64), graph.nodes[0], (3, 3), None)
    expected = y.transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_allclose(rows @ w.reshape(5, -1).T + b, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["densenet_tiny", "resnet_tiny_basic"])
def test_data_free_obs_with_and_without_batchnorm(exported, tmp_path, name):
    """densenet_tiny keeps BatchNorm in the graph, resnet_tiny_basic's is folded by the exporter;
    both prune data-free, say so, and stay closer to the original than L2 magnitude on held-out
    inputs of the synthetic kind the statistics came from."""
    source = exported(name)
    has_bn = any(n.op_type == "BatchNormalization" for n in onnx.load(source).graph.node)
    assert has_bn == (name == "densenet_tiny")
    report = prune(source, tmp_path / "p.onnx", PruneConfig(flops=0.5, criterion="obs", calibration_samples=16,
                                                            bench_runs=0))
    assert report.calibration.startswith("data-free, 16 synthetic samples: 'input': 16 ")
    assert ("BatchNorm layers best" if has_bn else "standardised to zero mean and unit variance (a default: no BatchNorm to fit)") in report.calibration
    assert report.compensated > 0 and report.flops_ratio <= 0.52
    prune(source, tmp_path / "l2.onnx", PruneConfig(flops=0.5, criterion="l2", bench_runs=0))
    feeds, _ = synthetic_calibration(load_model(source), 8, seed=1)

    def cosine(path) -> float:
        """Mean over the samples of the cosine between the model's and the original's outputs."""
        values = []
        for i in range(8):
            sample = {k: v[i : i + 1] for k, v in feeds.items()}
            a, b = (run_model(onnx.load(p), sample)[0].ravel() for p in (source, path))
            values.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return float(np.mean(values))

    assert cosine(tmp_path / "p.onnx") > cosine(tmp_path / "l2.onnx")


def test_calibration_files(tmp_path, exported):
    graph = load_model(exported("conv_fc"))
    data = synthetic_inputs({"input": (10, *graph.input_shapes["input"][1:])}, graph.dtypes, 1)["input"]
    np.savez(tmp_path / "c.npz", input=data)
    assert load_calibration(tmp_path / "c.npz", graph, 4)["input"].shape == (4, *data.shape[1:])
    folder = tmp_path / "dir"
    folder.mkdir()
    np.save(folder / "input.npy", data)
    np.testing.assert_array_equal(load_calibration(folder, graph, 100)["input"], data)
    np.save(tmp_path / "one.npy", data)  # one array: the one input's samples
    np.testing.assert_array_equal(load_calibration(tmp_path / "one.npy", graph, 100)["input"], data)
    with pytest.raises(InputError, match=r"one\.npy is one array and the model has 2 inputs \(ids, mask\)"):
        read_arrays(tmp_path / "one.npy", ["ids", "mask"])
    np.save(tmp_path / "objects.npy", np.array([{"input": data}], dtype=object))
    with pytest.raises(InputError, match=r"cannot be read as numpy data \(it holds Python objects, not arrays\); "
                                         r"give an \.npz of one array per input name"):
        load_calibration(tmp_path / "objects.npy", graph, 4)
    (tmp_path / "notes.txt").write_text("not samples")
    with pytest.raises(InputError, match=r"notes\.txt cannot be read as numpy data \(.*\); give an \.npz"):
        load_calibration(tmp_path / "notes.txt", graph, 4)
    np.savez(tmp_path / "wrong.npz", other=data)
    with pytest.raises(InputError, match="no array for input"):
        load_calibration(tmp_path / "wrong.npz", graph, 4)
    np.savez(tmp_path / "shape.npz", input=data[:, :, :2])
    with pytest.raises(InputError, match="expected \\(samples"):
        load_calibration(tmp_path / "shape.npz", graph, 4)
    data[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=data)
    with pytest.raises(InputError, match="input holds NaN or infinite values"):
        load_calibration(tmp_path / "nan.npz", graph, 4)


def test_calibration_values_the_input_type_cannot_hold_are_refused(tmp_path, exported):
    """Arrays are cast to the input's type only when that keeps every value: integers to float and
    integral floats to integer ids pass unchanged, a fraction, an out-of-range id or a finite
    value that overflows float32 is one clear error naming it."""
    np.testing.assert_array_equal(cast_exactly(np.array([101.0, 2054.0]), np.dtype(np.int64), "ids"), [101, 2054])
    assert cast_exactly(np.arange(3), np.dtype(np.float32), "x").dtype == np.float32
    assert cast_exactly(np.array([True, False]), np.dtype(np.bool_), "mask").dtype == np.bool_
    for values, dtype, shown in (([1.0, 0.5], np.int64, "0.5"), ([7, 2**40], np.int32, str(2**40)),
                                 ([2.0, 3.0], np.bool_, "2.0"), ([1.0, 1e40], np.float32, "1e+40"),
                                 ([-1, 3], np.uint8, "-1")):
        with pytest.raises(InputError, match=f"ids holds {re.escape(shown)}, which the input's type "
                                             f"{np.dtype(dtype).name} cannot hold"):
            cast_exactly(np.array(values), np.dtype(dtype), "ids")
    graph = load_model(exported("conv_fc"))
    wide = np.full((4, *graph.input_shapes["input"][1:]), 1e39)
    np.savez(tmp_path / "wide.npz", input=wide)
    with pytest.raises(InputError, match="calibration array 'input' holds 1e\\+39"):
        load_calibration(tmp_path / "wide.npz", graph, 4)


def test_degenerate_calibration_is_reported(tmp_path, exported):
    """Samples that are all one input (copies of one sample, a blank image) are named in the
    report; varied samples, and integer inputs constant by design (token types), are not."""
    source = exported("conv_fc")
    graph = load_model(source)
    varied = synthetic_inputs({"input": (16, *graph.input_shapes["input"][1:])}, graph.dtypes, 3)["input"]
    assert sameness({"input": varied}) is None
    assert sameness({"ids": np.arange(12).reshape(4, 3), "types": np.zeros((4, 3), np.int64)}) is None
    assert sameness({"input": np.zeros_like(varied[:1])}) == "input 'input' holds the one value 0 throughout"
    copies = np.repeat(varied[:1], 16, axis=0)
    assert sameness({"input": copies}) == "its 16 samples are all the same"
    for data, expected in ((varied, None), (copies, "its 16 samples are all the same")):
        np.savez(tmp_path / "c.npz", input=data)
        report = prune(source, tmp_path / "p.onnx", PruneConfig(flops=0.6, criterion="obs", calibration=str(tmp_path / "c.npz"),
                                                                 bench_runs=0))
        assert report.calibration_warning == expected
        console = Console(record=True, width=400)
        render_report(report, console)
        assert ("warning: the --calib data describes one input" in console.export_text()) == (expected is not None)


def test_calibration_under_fast_settings_measures_fidelity(tmp_path, exported):
    """Settings that collect no statistics (l2, score allocation, no re-fit) still read and check
    ``--calib``: its first 32 samples measure the pruned model, and the report says the data
    chose nothing. The figures are those of an independent onnxruntime run on the same samples."""
    source = exported("conv_fc")
    graph = load_model(source)
    samples = synthetic_inputs({"input": (40, *graph.input_shapes["input"][1:])}, graph.dtypes, 5)["input"]
    np.savez(tmp_path / "c.npz", input=samples)
    fast = dict(flops=0.6, criterion="l2", allocation="score", refit_rounds=0, bench_runs=0)
    report = prune(source, tmp_path / "p.onnx", PruneConfig(**fast, calibration=str(tmp_path / "c.npz")))
    assert report.compensated == 0
    assert report.held_out_fidelity.source == "32 --calib samples"
    original, pruned = onnx.load(source), onnx.load(tmp_path / "p.onnx")
    before = np.concatenate([run_model(original, {"input": x[None]})[0].reshape(1, -1) for x in samples[:32]])
    after = np.concatenate([run_model(pruned, {"input": x[None]})[0].reshape(1, -1) for x in samples[:32]])
    cosines = np.sum(before * after, 1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1))
    assert report.held_out_fidelity.cosine == pytest.approx(float(np.mean(cosines)), abs=1e-5)
    assert report.held_out_fidelity.top1_agreement == pytest.approx(np.mean(before.argmax(1) == after.argmax(1)))
    console = Console(record=True, width=400)
    render_report(report, console)
    text = console.export_text()
    assert "statistics: --calib measures fidelity only (32 samples from" in text
    assert "weight tensors compensated" not in text
    np.savez(tmp_path / "bad.npz", input=samples[..., :1])
    with pytest.raises(InputError, match=r"calibration array 'input' has shape \(40, 1, 8, 1\)"):
        prune(source, tmp_path / "q.onnx", PruneConfig(**fast, calibration=str(tmp_path / "bad.npz")))
    assert not (tmp_path / "q.onnx").exists()
