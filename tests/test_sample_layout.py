"""Inputs whose samples are not on the first axis: a recurrent model's initial state
``[directions, batch, hidden]`` and a scalar (a sample rate), as silero VAD takes them. Their
calibration arrays are read along the right axis, statistics and the re-fit run on them, and
the pruned model keeps the interface."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from spa_compiler import PruneConfig, load_model, prune
from spa_compiler.errors import InputError
from spa_compiler.calibrate import load_calibration, sameness
from spa_compiler.sample_layout import model_feeds, sample_shape
from spa_compiler.shapes import sample_axes
from test_op_rules import make_model

# y = (relu(x W1) W2 + Σ_directions state) · [sr == 16000]; stateN = state + y
STATEFUL = """g (float[{b},8] x, float[2,{b},4] state, int64 sr) => (float[{b},4] y, float[2,{b},4] stateN) {{
    h = MatMul (x, W1)
    r = Relu (h)
    p = MatMul (r, W2)
    s = ReduceSum <keepdims = 0> (state, zero_axis)
    a = Add (p, s)
    e = Equal (sr, rate)
    g = Cast <to = 1> (e)
    y = Mul (a, g)
    u = Unsqueeze (y, zero_axis)
    stateN = Add (state, u)
}}"""


def _model(batch: str) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    consts = {"W1": rng.standard_normal((8, 32)).astype(np.float32) / 3,
              "W2": rng.standard_normal((32, 4)).astype(np.float32) / 6,
              "zero_axis": np.asarray([0], np.int64), "rate": np.asarray(16000, np.int64)}
    return make_model(STATEFUL.format(b=batch), 13, consts)


def _calibration(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Samples as the model takes them: ``x`` rank-3 correlated (so pruning is lossy but
    compensable), states along axis 1, one sample rate."""
    mixing = np.random.default_rng(7).standard_normal((3, 8))  # one subspace for every draw
    return {"x": (rng.standard_normal((count, 3)) @ mixing + 0.05 * rng.standard_normal((count, 8))).astype(np.float32),
            "state": rng.standard_normal((2, count, 4)).astype(np.float32),
            "sr": np.asarray(16000, np.int64)}


def test_sample_axes_follow_the_named_batch_or_the_axis_of_one():
    assert sample_axes(_model("batch")) == {"x": 0, "state": 1, "sr": None}
    assert sample_axes(_model("1")) == {"x": 0, "state": 1, "sr": None}  # fixed: the axis of size 1


def test_calibration_arrays_are_read_along_each_inputs_sample_axis(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model("batch"), str(path))
    graph = load_model(path)
    given = _calibration(5, np.random.default_rng(0))
    np.savez(tmp_path / "c.npz", **given)
    loaded = load_calibration(tmp_path / "c.npz", graph, 4)
    assert {name: a.shape for name, a in loaded.items()} == {"x": (4, 8), "state": (4, 2, 4), "sr": (4,)}
    assert sample_shape(graph, "state") == (2, 4) and sample_shape(graph, "sr") == ()
    np.testing.assert_array_equal(loaded["state"][1], given["state"][:, 1])
    fed = model_feeds(graph, {name: a[1:3] for name, a in loaded.items()})
    np.testing.assert_array_equal(fed["state"], given["state"][:, 1:3])
    assert fed["sr"].shape == () and int(fed["sr"]) == 16000
    np.savez(tmp_path / "two_rates.npz", **{**given, "sr": np.asarray([16000, 8000, 16000, 16000, 16000])})
    with pytest.raises(InputError, match="'sr' is a scalar, one value for all samples; give one value"):
        load_calibration(tmp_path / "two_rates.npz", graph, 4)
    np.savez(tmp_path / "short.npz", **{**given, "state": given["state"][:, :3]})
    with pytest.raises(InputError, match="same, non-zero number of samples"):
        load_calibration(tmp_path / "short.npz", graph, 4)


@pytest.mark.accurate
@pytest.mark.parametrize("batch", ["batch", "1"])
def test_stateful_model_prunes_with_statistics_and_keeps_its_interface(tmp_path, batch):
    """Before, the statistics fed states cut along their first axis and fell back to magnitudes."""
    source, output = tmp_path / "m.onnx", tmp_path / "small.onnx"
    onnx.save(_model(batch), str(source))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", **_calibration(96, rng))
    report = prune(source, output, PruneConfig(ratio=0.5, calibration=str(tmp_path / "c.npz"), bench_runs=0))
    assert report.calibration.startswith("84 samples from") and report.compensated >= 1
    assert report.held_out_fidelity.source == "12 held-out calibration samples"
    assert report.held_out_fidelity.cosine > 0.99
    pruned = onnx.load(str(output))
    assert [d.dim_value or d.dim_param for d in pruned.graph.input[1].type.tensor_type.shape.dim] == \
        [d.dim_value or d.dim_param for d in _model(batch).graph.input[1].type.tensor_type.shape.dim]
    assert [tuple(t.dims) for t in pruned.graph.initializer if t.name == "W1"] == [(8, 16)]
    test = _calibration(1 if batch == "1" else 3, rng)
    before = ort.InferenceSession(str(source)).run(None, test)
    after = ort.InferenceSession(str(output)).run(None, test)
    for b, a in zip(before, after):
        assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b)


def test_a_zero_initial_state_beside_varied_inputs_is_no_warning():
    varied = _calibration(4, np.random.default_rng(2))
    zero_state = {"x": varied["x"], "state": np.zeros((4, 2, 4), np.float32)}
    assert sameness(zero_state) is None
    blank = {**zero_state, "x": np.ones_like(varied["x"]), "sr": np.arange(4)}  # samples differ, no float input does
    assert sameness(blank) == "input 'x' holds the one value 1 throughout"


@pytest.mark.accurate
def test_stateful_model_data_free_collects_statistics(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(_model("batch"), str(source))
    report = prune(source, tmp_path / "small.onnx", PruneConfig(ratio=0.5, bench_runs=0))
    assert report.calibration.startswith("data-free") and report.compensated >= 1
