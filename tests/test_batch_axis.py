"""A declared batch (of 1, or of the export's example): runs of many samples batch them where the
model computes each sample on its own, and hold exactly the declared batch where it does not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler import Graph, PruneConfig, load_model, prune_graph
from spa_compiler.analysis import analyze_graph
from spa_compiler.batch_axis import exact_batch, fixed_batch
from spa_compiler import batch_axis, calibrate
from spa_compiler.calibrate import collect_statistics, consumer_layers, statistics_batch_size
from spa_compiler.shapes import free_batch


def _conv_model(tail: list[onnx.NodeProto], tail_inits: list[onnx.TensorProto], out_shape: list[int],
                folder, batch: int = 1) -> Graph:
    """x [batch, 3, 8, 8] -> Conv(8) -> Relu -> Conv(4) -> ``tail`` -> y ``out_shape``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
        *tail_inits,
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        *tail,
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    return load_model(folder / "model.onnx")


def _per_sample(folder, batch: int = 1) -> Graph:
    shape = numpy_helper.from_array(np.array([-1, 256], np.int64), "shape")
    return _conv_model([helper.make_node("Reshape", ["c2", "shape"], ["y"], name="flat")], [shape], [batch, 256],
                       folder, batch)


def _batch_in_reshape(folder, batch: int = 1) -> Graph:
    """The flattening Reshape holds the batch as a constant, as exporters fold ``x.view(x.shape[0], -1)``."""
    shape = numpy_helper.from_array(np.array([batch, -1], np.int64), "shape")
    return _conv_model([helper.make_node("Reshape", ["c2", "shape"], ["y"], name="flat")], [shape], [batch, 256],
                       folder, batch)


def _mixing_samples(folder) -> Graph:
    """Samples averaged over the first axis: a batch of two gives one output row."""
    return _conv_model([helper.make_node("ReduceMean", ["c2"], ["y"], name="mean", axes=[0], keepdims=1)], [],
                       [1, 4, 8, 8], folder)


def test_a_declared_batch_of_one_runs_batched_where_samples_are_independent(tmp_path):
    graph = _per_sample(tmp_path)
    assert not fixed_batch(graph)
    assert statistics_batch_size(graph, 16, consumer_layers(analyze_graph(graph))) == 16
    assert graph.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the model itself is unchanged


@pytest.mark.parametrize("build", [_batch_in_reshape, _mixing_samples], ids=["reshape-to-1", "mean-over-samples"])
def test_a_batch_the_model_fixes_inside_runs_one_sample_at_a_time(build, tmp_path):
    graph = build(tmp_path)
    assert fixed_batch(graph)
    assert statistics_batch_size(graph, 16, consumer_layers(analyze_graph(graph))) == 1


def test_a_declared_batch_of_four_runs_any_batch_where_samples_are_independent(tmp_path):
    graph = _per_sample(tmp_path, batch=4)
    assert not fixed_batch(graph) and exact_batch(graph) is None
    assert statistics_batch_size(graph, 16, consumer_layers(analyze_graph(graph))) == 16


def test_a_batch_of_four_the_model_fixes_inside_runs_four_samples_at_a_time(tmp_path):
    graph = _batch_in_reshape(tmp_path, batch=4)
    assert fixed_batch(graph) and exact_batch(graph) == 4
    assert statistics_batch_size(graph, 16, consumer_layers(analyze_graph(graph))) == 4


def test_statistics_of_a_fixed_batch_count_no_sample_twice(tmp_path, monkeypatch):
    """Ten samples in batches of 6 run as 4 + 2 and 4 samples in a model that takes exactly 4:
    the run of 2 is topped up with copies of its last sample, which the statistics leave out.
    Every row taken (rows_per_feature 128), H is that of the same weights in a model whose batch
    is free, to float32 rounding, and counts each of the 10 samples' 64 positions once."""
    monkeypatch.setattr(calibrate, "ROWS_PER_FEATURE", 128)
    data = {"x": np.random.default_rng(3).standard_normal((10, 3, 8, 8)).astype(np.float32)}
    (tmp_path / "fixed").mkdir()
    fixed = _batch_in_reshape(tmp_path / "fixed", batch=4)
    free = _per_sample(tmp_path, batch=4)
    stats = [collect_statistics(g, consumer_layers(analyze_graph(g)), data, batch_size=6) for g in (fixed, free)]
    for name in ("conv1", "conv2"):
        assert stats[0][name].rows == stats[1][name].rows == 10 * 64
        np.testing.assert_allclose(stats[0][name].hessian, stats[1][name].hessian, rtol=1e-5,
                                   atol=1e-6 * np.abs(stats[1][name].hessian).max())


@pytest.mark.accurate
def test_a_fixed_batch_of_four_prunes_as_a_free_batch_does_and_keeps_its_shapes(tmp_path):
    """30 calibration samples, 3 of them held out: every pass runs the model four samples at a
    time, topping up the last run of a count four does not divide (27, 3). It removes the
    channels the same weights remove in a model whose batch is free, its held-out error within
    0.002 of that one's (the re-fit's folds, alternate runs, differ), and keeps its declared batch."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((30, 3, 8, 8)).astype(np.float32))
    config = PruneConfig(flops=0.7, calibration=calib, round_to=1)
    (tmp_path / "fixed").mkdir()
    fixed = prune_graph(_batch_in_reshape(tmp_path / "fixed", batch=4), config)
    free = prune_graph(_per_sample(tmp_path, batch=4), config)
    values = (*fixed.model.graph.input, *fixed.model.graph.output)
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]
    assert dims == [[4, 3, 8, 8], [4, 256]]
    assert fixed.calibration.startswith("27 samples from") and set(fixed.compensated) == {"w1", "w2"}
    assert fixed.plan.achieved == free.plan.achieved <= 0.7
    assert {g: list(u) for g, u in fixed.plan.removed.items()} == {g: list(u) for g, u in free.plan.removed.items()}
    assert fixed.held_out_fidelity.samples == free.held_out_fidelity.samples == 3
    assert abs(fixed.held_out_fidelity.relative_error - free.held_out_fidelity.relative_error) < 0.002


@pytest.mark.parametrize("rows_per_feature", [8, 1])
@pytest.mark.parametrize("run_bytes", [1000, 3 * 2816 + 100], ids=["one-sample-runs", "three-sample-runs"])
def test_statistics_do_not_depend_on_the_samples_per_run(tmp_path, monkeypatch, run_bytes, rows_per_feature):
    """Rows are drawn per batch of 6 (a random subset: conv1 has 64 patches per sample and takes
    ``rows_per_feature`` * 28 / 2 of a batch's 384), then each run keeps those of its samples: the
    same H, whether a run takes the batch, three samples or one (with one row per feature conv2
    draws 5 rows from a batch of 6 samples, so some runs hold none)."""
    monkeypatch.setattr(calibrate, "ROWS_PER_FEATURE", rows_per_feature)
    graph = _per_sample(tmp_path)
    layers = consumer_layers(analyze_graph(graph))
    data = {"x": np.random.default_rng(1).standard_normal((12, 3, 8, 8)).astype(np.float32)}
    whole = collect_statistics(graph, layers, data, batch_size=6)
    monkeypatch.setattr(batch_axis, "RUN_BYTES", run_bytes)
    assert statistics_batch_size(graph, 6, layers) in (1, 3)
    parts = collect_statistics(graph, layers, data, batch_size=6)
    for name in whole:
        assert whole[name].rows == parts[name].rows
        np.testing.assert_allclose(parts[name].hessian, whole[name].hessian, rtol=1e-6, atol=1e-6 * np.abs(whole[name].hessian).max())
    assert whole["conv1"].rows == 2 * -(-rows_per_feature * 28 // 2) < 12 * 64  # a subset, over 2 batches


def test_pruning_a_batch_of_one_model_keeps_its_declared_shapes(tmp_path):
    graph = _per_sample(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32))
    state = prune_graph(graph, PruneConfig(flops=0.7, criterion="obs", calibration=calib, round_to=1))
    model = state.model
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)]
    assert dims == [[1, 3, 8, 8], [1, 256]]
    assert state.held_out_fidelity is not None and state.held_out_fidelity.samples == 4


def test_statistics_runs_hold_at_most_run_bytes_of_layer_inputs(tmp_path, monkeypatch):
    """Layer inputs per sample: x (3·8·8 floats) and conv1's output (8·8·8), 2816 bytes."""
    graph = _per_sample(tmp_path)
    layers = consumer_layers(analyze_graph(graph))
    monkeypatch.setattr(batch_axis, "RUN_BYTES", 3 * 2816 + 100)
    assert statistics_batch_size(graph, 16, layers) == 3
    monkeypatch.setattr(batch_axis, "RUN_BYTES", 1000)
    assert statistics_batch_size(graph, 16, layers) == 1


@pytest.mark.parametrize("batch", [1, 3])
def test_free_batch_names_the_interface_batch_and_leaves_intermediate_leading_ones_unknown(batch):
    value = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["z"]), helper.make_node("Relu", ["z"], ["y"])], "g",
        [value("x", TensorProto.FLOAT, [batch, 4])],
        [value("y", TensorProto.FLOAT, [batch, 4]), value("s", TensorProto.FLOAT, [2, 4])],
        value_info=[value("z", TensorProto.FLOAT, [batch, 4])],
    ))
    free_batch(model)
    first = [v.type.tensor_type.shape.dim[0] for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)]
    assert [d.dim_param for d in first] == ["batch", "batch", "", ""]
    assert [d.dim_value for d in first] == [0, 0, 2, 0] and not first[3].HasField("dim_value")


@pytest.mark.accurate
@pytest.mark.parametrize("run_bytes, batch", [(3 * 2816 + 100, 3), (1 << 30, 16)])
def test_re_fit_runs_return_at_most_their_bound_of_layer_inputs(tmp_path, monkeypatch, run_bytes, batch):
    """The re-fit's runs return the inputs of the layers it fits (conv1 reads x, 768 bytes per
    sample; conv2 reads relu1, 2048): at most ``refit.RUN_BYTES`` a run, two runs in flight."""
    from spa_compiler import paired, refit

    sizes = []
    original_init = paired.PairedRunner.__init__

    def recording(self, graph, pruned, layers, weights, batch_size=16, streams=None):
        sizes.append(batch_size)
        original_init(self, graph, pruned, layers, weights, batch_size, streams)

    monkeypatch.setattr(refit, "RUN_BYTES", run_bytes)
    monkeypatch.setattr(refit.PairedRunner, "__init__", recording)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32))
    prune_graph(_per_sample(tmp_path), PruneConfig(flops=0.7, criterion="obs", calibration=calib, round_to=1))
    assert sizes == [batch]


def test_distillation_needs_a_declared_batch_of_samples_to_train_on(tmp_path):
    """A model declaring a batch of 4 trains on batches of 4: 4 samples, one of them held out,
    are refused in one line that says what to do, before PyTorch is needed; 5 are enough."""
    from spa_compiler.distill_data import distillation_data
    from spa_compiler.errors import InputError

    _batch_in_reshape(tmp_path, batch=4)
    model = tmp_path / "model.onnx"
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"4 samples, 3 to train on .* needs at least 4 \(the model declares a batch "
                                         r"of 4\): give more samples"):
        distillation_data(model, model, tmp_path / "data.npz", tmp_path / "out.onnx")
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    prepared = distillation_data(model, model, tmp_path / "data.npz", tmp_path / "out.onnx")
    assert (len(prepared.train["x"]), len(prepared.test["x"])) == (4, 1)


@pytest.mark.accurate
def test_mtcnn_exported_with_four_faces_prunes_with_its_statistics(tmp_path):
    """MTCNN's refinement network as ``models.torch_zoo`` defines it (random weights), exported
    with 4 faces: the exporter writes its flattening as a Reshape to ``[4, -1]``. Data-free at
    half the FLOPs it is pruned from statistics of 256 synthetic pictures run four at a time,
    its layers compensated, and it keeps its declared batch."""
    torch = pytest.importorskip("torch")
    from models.torch_zoo import MODELS, export_network
    from spa_compiler import prune

    torch.manual_seed(0)
    source = export_network(MODELS["mtcnn_rnet"].build().eval(), {"faces": (4, 3, 24, 24)}, tmp_path / "rnet.onnx")
    graph = load_model(source)
    assert fixed_batch(graph) and exact_batch(graph) == 4
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert report.calibration.startswith("data-free, 256 synthetic samples") and report.compensated >= 3
    assert report.flops_ratio <= 0.5 and report.held_out_fidelity.samples == 16
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 24, 24]
