"""Reading and writing models through the Python API: dynamic batch, external data, old opsets,
atomic saving, the errors ``load_model`` raises, and registering a criterion."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa_compiler
from spa_compiler import model_files
from spa_compiler.calibrate import array_shapes
from spa_compiler.proto_copy import copy_without_initializers
from spa_compiler.shapes import bind_input_shapes
from spa_compiler.verify import reference_session, run_model
from spa_compiler import (
    InputError,
    ModelError,
    OutputError,
    PruneConfig,
    UnsupportedModelError,
    load_model,
    parse_input_shapes,
    prune,
    prune_graph,
    save_model,
)

from helpers import EXAMPLE, dynamic_example_file


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return out


def seeded_input(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def default_opset(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def small_model(nodes, inputs, outputs, inits=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset >= 13 else 3
    return model


# --------------------------------------------------------------------------- exported models


@pytest.fixture(scope="module")
def tiny_resnets(tmp_path_factory) -> dict[str, Path]:
    """resnet_tiny_basic exported with a dynamic batch (opset 17) and at opsets 9 and 13."""
    pytest.importorskip("torch")
    from models.export import export_architecture, export_onnx
    from models.zoo import ARCHITECTURES

    root = tmp_path_factory.mktemp("tiny_resnets")
    spec = ARCHITECTURES["resnet_tiny_basic"]
    paths = {"dynamic": export_onnx(spec.builder(), spec.input_shape, root / "dyn.onnx", dynamic_batch=True)}
    for opset in (9, 13):
        try:
            paths[f"opset{opset}"] = export_architecture("resnet_tiny_basic", root / f"o{opset}.onnx", opset)
        except Exception:  # the exporter may not reach this opset
            if opset != 9:
                raise
            paths["opset9"] = export_architecture("resnet_tiny_basic", root / "o10.onnx", 10)
    return paths


def test_dynamic_batch_is_kept(tmp_path, tiny_resnets):
    source = tiny_resnets["dynamic"]
    digest = sha(source)
    report = prune(source, tmp_path / "out.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert 0.45 <= report.flops_ratio <= 0.52
    assert sha(source) == digest
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    (inp,) = [i for i in pruned.graph.input if i.name == "input"]
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value"), "the batch dimension became fixed"
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert pruned.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    x = seeded_input(3, 3, 32, 32)
    out = run(tmp_path / "out.onnx", x)
    assert out.shape == (3, 10)
    # each sample is computed independently: batch 3 equals three batch-1 runs
    singles = np.concatenate([run(tmp_path / "out.onnx", x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(out, singles, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["opset9", "opset13"])
def test_old_opsets(tmp_path, tiny_resnets, key):
    source = tiny_resnets[key]
    original = onnx.load(str(source))
    report = prune(source, tmp_path / "out.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert 0.45 <= report.flops_ratio <= 0.52
    assert report.params_ratio < 1
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    assert default_opset(pruned) == default_opset(original), "the opset changed"
    assert pruned.ir_version == original.ir_version
    assert run(tmp_path / "out.onnx", seeded_input(1, 3, 32, 32)).shape == (1, 10)


# --------------------------------------------------------------------------- external data


def test_external_data_round_trip(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(EXAMPLE)), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    inputs = {p.name: sha(p) for p in tmp_path.iterdir()}
    assert set(inputs) == {"ext.onnx", "w.data"}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "small.onnx"

    report = prune(source, out, PruneConfig(flops=0.5, bench_runs=0))

    assert 0.45 <= report.flops_ratio <= 0.52
    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()} == inputs, "the input changed"
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", "small.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    locations = {
        entry.value
        for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    }
    assert locations == {"small.onnx.data"}
    assert report.size_after == out.stat().st_size + (out_dir / "small.onnx.data").stat().st_size
    assert report.size_before == source.stat().st_size + (tmp_path / "w.data").stat().st_size  # the file it names
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(str(out))
    assert all(t.data_location != TensorProto.EXTERNAL for t in loaded.graph.initializer)

    # the same model stored inline prunes to the same weights and outputs
    inline = prune(EXAMPLE, tmp_path / "inline.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert inline.flops_ratio == report.flops_ratio
    x = seeded_input(1, 3, 32, 32)
    out_ext, out_inline = run(out, x), run(tmp_path / "inline.onnx", x)
    assert out_ext.shape == (1, 10)
    np.testing.assert_array_equal(out_ext, out_inline)


def test_file_size_counts_only_the_data_the_model_refers_to(tmp_path):
    """A ``<name>.data`` an earlier model left beside the output is not the pruned model's."""
    out = tmp_path / "small.onnx"
    (tmp_path / "small.onnx.data").write_bytes(bytes(1 << 20))
    report = prune(EXAMPLE, out, PruneConfig(flops=0.5, bench_runs=0))
    assert report.size_after == out.stat().st_size and report.size_before == EXAMPLE.stat().st_size


def test_external_data_output_elsewhere_with_latency(tmp_path, monkeypatch):
    """Input, output and working directory all differ, and latency is measured after saving:
    the saved model's weights must still be in memory (onnxruntime 1.32 refuses a model handed
    over as bytes whose tensors point at files)."""
    for name in ("in", "out", "cwd"):
        (tmp_path / name).mkdir()
    source = tmp_path / "in" / "ext.onnx"
    onnx.save_model(onnx.load(str(EXAMPLE)), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    monkeypatch.chdir(tmp_path / "cwd")

    report = prune(source, tmp_path / "out" / "m.onnx", PruneConfig(flops=0.5, bench_runs=2))

    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    assert list((tmp_path / "cwd").iterdir()) == []
    assert run(tmp_path / "out" / "m.onnx", seeded_input(1, 3, 32, 32)).shape == (1, 10)


def test_save_model_leaves_the_model_in_memory(tmp_path):
    model = onnx.load(str(EXAMPLE))
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    header = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    offsets = [
        int(entry.value)
        for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "offset"
    ]
    assert offsets and all(offset % 4096 == 0 for offset in offsets)


def test_external_data_moved_away_is_an_input_error(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(EXAMPLE)), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(InputError, match="external"):
        load_model(source)


# --------------------------------------------------------------------------- load_model errors


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(InputError, match="ONNX"):
        load_model(tmp_path / "text.onnx")
    data = EXAMPLE.read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="ONNX"):
        load_model(tmp_path / "half.onnx")


def test_load_qoperator_quantized_and_old_opset_are_unsupported(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    q = helper.make_tensor_value_info("q", TensorProto.UINT8, [4, 4])
    params = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    qoperator = small_model(
        [helper.make_node("QLinearMatMul", ["q", "s", "z", "q", "s", "z", "s", "z"], ["qy"], name="qmm")],
        [q], [helper.make_tensor_value_info("qy", TensorProto.UINT8, [4, 4])], params,
    )
    onnx.save(qoperator, str(tmp_path / "q.onnx"))
    with pytest.raises(UnsupportedModelError, match="quantized model: its QLinearMatMul node 'qmm'"):
        load_model(tmp_path / "q.onnx")
    old = small_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=8)
    onnx.save(old, str(tmp_path / "old.onnx"))
    with pytest.raises(UnsupportedModelError, match="opset 8"):
        load_model(tmp_path / "old.onnx")


def test_dynamic_dimension_binding(tmp_path):
    dynamic_example_file(tmp_path)
    with pytest.raises(ModelError, match=r"'input'.*--input-shape input="):
        load_model(tmp_path / "dyn.onnx")
    graph = load_model(tmp_path / "dyn.onnx", {"input": (2, 3, 32, 32)})
    assert graph.input_shapes == {"input": (2, 3, 32, 32)}
    assert graph.shapes[graph.outputs[0]] == (2, 10)
    with pytest.raises(InputError, match="4"):
        load_model(tmp_path / "dyn.onnx", {"input": (1, 3, 32)})
    with pytest.raises(InputError, match="foo"):
        load_model(tmp_path / "dyn.onnx", {"foo": (1, 3, 32, 32)})


def test_named_dimensions_bind_together():
    """Inputs sharing a dim_param take the size --input-shape gave one of them; the error for
    unbound ones names them all and the options that bind them (anonymous axes need each input)."""
    def model(a_dims, b_dims):
        inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in (("a", a_dims), ("b", b_dims))]
        return small_model([helper.make_node("Add", ["a", "b"], ["y"])], inputs,
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])

    named = model(["batch", "sequence"], ["batch", "sequence"])
    assert bind_input_shapes(named, {"a": (2, 7)}) == {"a": (2, 7), "b": (2, 7)}
    with pytest.raises(ModelError, match=r"^graph input 'a' has an unknown dimension 1 \('sequence'\), as do b; "
                                         r"bind them with --input-shape a=1xN \(the others share its named dimensions\)$"):
        bind_input_shapes(named, {})
    anonymous = model(["batch", "?"], ["batch", "?"])
    with pytest.raises(ModelError, match=r"bind them with --input-shape a=1xN --input-shape b=1xN$"):
        bind_input_shapes(anonymous, {})
    assert bind_input_shapes(anonymous, {"a": (1, 3)}, {"b": (5, 3)}) == {"a": (1, 3), "b": (1, 3)}


@pytest.mark.accurate
def test_calibration_arrays_bind_the_free_dimensions(tmp_path):
    """Without --input-shape, the --calib arrays' shapes bind the free axes after the batch: the
    model is pruned (and its FLOPs counted) at 24x28, as the same run with --input-shape does."""
    dynamic_example_file(tmp_path)
    images = seeded_input(12, 3, 24, 28)
    np.savez(tmp_path / "calib.npz", input=images)
    config = PruneConfig(flops=0.6, calibration=str(tmp_path / "calib.npz"), bench_runs=0)
    from_data = prune(tmp_path / "dyn.onnx", tmp_path / "a.onnx", config)
    given = prune(tmp_path / "dyn.onnx", tmp_path / "b.onnx", dataclasses.replace(config, input_shapes={"input": (1, 3, 24, 28)}))
    assert "their shapes bind input=1x3x24x28" in from_data.calibration
    assert "their shapes bind" not in given.calibration
    fast = dataclasses.replace(config, criterion="l2", allocation="score", refit_rounds=0)  # the file measures fidelity only
    assert "their shapes bind input=1x3x24x28" in prune(tmp_path / "dyn.onnx", tmp_path / "c.onnx", fast).calibration
    assert from_data.macs_before == given.macs_before and from_data.macs_after == given.macs_after
    np.testing.assert_allclose(run(tmp_path / "a.onnx", images[:2]), run(tmp_path / "b.onnx", images[:2]), rtol=0, atol=0)
    with pytest.raises(InputError, match=r"calibration array 'input' has shape \(12, 24, 28\); the model input has 4"):
        load_model(tmp_path / "dyn.onnx", data_shapes={"input": (12, 24, 28)})
    assert load_model(tmp_path / "dyn.onnx", data_shapes={"a": (5, 3, 8, 9)}).input_shapes == {"input": (1, 3, 8, 9)}


def test_calibration_array_shapes_come_from_the_headers(tmp_path):
    np.savez(tmp_path / "two.npz", ids=np.zeros((4, 32), np.int64), mask=np.ones((4, 31), np.int64))
    assert array_shapes(tmp_path / "two.npz") == {"ids": (4, 32), "mask": (4, 31)}
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", np.zeros((3, 1, 5, 6), np.float32))
    assert array_shapes(tmp_path / "folder") == {"x": (3, 1, 5, 6)}
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert array_shapes(tmp_path / "broken.npz") == {} and array_shapes(tmp_path / "absent.npz") == {}


@pytest.mark.parametrize("opset, mask_type", [(9, TensorProto.FLOAT), (13, TensorProto.BOOL)])
def test_dropout_mask_shape_without_running_the_model(tmp_path, monkeypatch, opset, mask_type):
    """A Dropout's mask has its data's shape; before opset 10 ONNX's inference leaves it unset,
    and the loader must not run the model (weights and all) for it."""
    dropout = helper.make_node("Dropout", ["h"], ["y", "mask"], **({"ratio": 0.5} if opset < 12 else {}))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), dropout], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]), helper.make_tensor_value_info("mask", mask_type, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 6
    onnx.save(model, str(tmp_path / "dropout.onnx"))

    def unexpected(*args):
        raise AssertionError("onnxruntime ran for shapes")

    monkeypatch.setattr(spa_compiler.shapes, "_run_for_shapes", unexpected)
    loaded = load_model(tmp_path / "dropout.onnx")
    assert loaded.shapes["mask"] == (2, 5)
    assert loaded.dtypes["mask"] == mask_type


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1x3x224x224", "y=2x5"]) == {"x": (1, 3, 224, 224), "y": (2, 5)}
    assert parse_input_shapes([]) == {} and parse_input_shapes(None) == {}
    for bad in ("x=1x3x", "x=", "=1x3", "1x3", "x=1,3", "x=-1x3"):
        with pytest.raises(InputError, match="NAME=1x3x224x224"):
            parse_input_shapes([bad])


# --------------------------------------------------------------------------- saving


def test_save_model_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    model = onnx.load(str(EXAMPLE))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def broken_write(path, data):
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])  # the disk fills up half-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_files, "_write", broken_write)
    with pytest.raises(OutputError, match="cannot write"):
        save_model(model, target)
    assert target.read_bytes() == b"previous", "a failed save damaged the existing file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "a temporary file was left behind"

    monkeypatch.undo()
    save_model(model, target)
    assert onnx.load(str(target)).graph.node[0].name == model.graph.node[0].name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_model_external_data(tmp_path):
    model = onnx.load(str(EXAMPLE))
    out = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < (tmp_path / "m.onnx.data").stat().st_size
    assert run(out, seeded_input(1, 3, 32, 32)).shape == (1, 10)


def test_save_model_output_errors(tmp_path):
    model = onnx.load(str(EXAMPLE))
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "nodir" / "m.onnx")
    with pytest.raises(OutputError, match="directory"):
        save_model(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_model_into_unwritable_directory_is_an_output_error(tmp_path):
    model = onnx.load(str(EXAMPLE))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked / "m.onnx" if not os.access(locked, os.W_OK) else Path("/proc/spa_prune_test_m.onnx")
        with pytest.raises(OutputError, match="cannot write|not writable"):
            save_model(model, target)
        assert not target.exists()
    finally:
        locked.chmod(0o755)


def test_prune_failure_writes_nothing(tmp_path):
    """A run that fails after loading (nothing prunable) leaves no output and no temp file."""
    model = small_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "W")],
    )
    onnx.save(model, str(tmp_path / "one.onnx"))
    with pytest.raises(spa_compiler.TargetError, match="nothing"):
        prune(tmp_path / "one.onnx", tmp_path / "out.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx"]


@pytest.mark.parametrize("pipeline", ["fast", pytest.param("default", marks=pytest.mark.accurate)])  # by the marker
def test_a_model_onnxruntime_refuses_is_a_model_error(tmp_path, pipeline):
    """An export whose shapes do not fit (a bias of 5 channels added to 4) is the model's fault,
    said as such by the first pass that runs it (the statistics', or the verification's before it
    checks the pruned model); nothing is written."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in [("W1", (8, 3, 3, 3)), ("W2", (4, 8, 3, 3)), ("b", (5, 1, 1))]]
    model = small_model(
        [helper.make_node("Conv", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "W2"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"], name="bias")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights,
    )
    onnx.save(model, str(tmp_path / "misfit.onnx"))
    with pytest.raises(ModelError, match=r"onnxruntime cannot run the input model \(.*Node \(bias\) Op \(Add\)"):
        prune(tmp_path / "misfit.onnx", tmp_path / "out.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["misfit.onnx"]


@pytest.mark.accurate
def test_activations_that_are_not_finite_are_said_and_the_weights_alone_still_prune(tmp_path):
    """A model computing NaN on some inputs (the square root of negative values) gives statistics
    of NaN: the statistics pass says so and what prunes without them, and that prunes it."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in [("W1", (32, 3, 3, 3)), ("W2", (4, 32, 3, 3))]]
    model = small_model(
        [helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("Conv", ["s", "W1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "W2"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])], weights,
    )
    onnx.save(model, str(tmp_path / "nan.onnx"))
    with pytest.raises(ModelError, match=r"not finite \(inf or NaN\) on synthetic samples \(the input of 'Conv_1' "
                                         r"and 1 more layers\).*--criterion l2 --allocation score --refit 0"):
        prune(tmp_path / "nan.onnx", tmp_path / "out.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert not (tmp_path / "out.onnx").exists()
    weights_alone = PruneConfig(flops=0.5, bench_runs=0, criterion="l2", allocation="score", refit_rounds=0)
    report = prune(tmp_path / "nan.onnx", tmp_path / "out.onnx", weights_alone)
    assert report.flops_ratio == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------- criterion registry


@pytest.fixture
def first_channels():
    from spa_compiler import criteria

    @spa_compiler.register_criterion("first_channels")
    class FirstChannels(spa_compiler.Criterion):
        description = "keeps the lowest channel indices"

        def score(self, group, ctx):
            return len(group.units) - np.arange(len(group.units), dtype=np.float64)  # higher = keep

    yield FirstChannels
    criteria._CRITERIA.pop("first_channels", None)


@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_registered_criterion_decides_what_goes(first_channels, scope):
    assert "first_channels" in spa_compiler.available_criteria()
    assert isinstance(spa_compiler.get_criterion("first_channels"), first_channels)
    graph = load_model(EXAMPLE)
    result = prune_graph(graph, PruneConfig(flops=0.5, criterion="first_channels", scope=scope, bench_runs=0))
    assert result.plan.n_removed > 0
    groups = {g.id: g for g in result.analysis.groups}
    for group_id, removed in result.plan.removed.items():
        if not removed:
            continue
        prunable = groups[group_id].prunable
        assert sorted(removed) == prunable[len(prunable) - len(removed):], (
            f"group {groups[group_id].name}: removed {sorted(removed)}, not the last channels"
        )
    onnx.checker.check_model(result.model, full_check=True)


def test_unknown_criterion_is_an_input_error():
    graph = load_model(EXAMPLE)
    with pytest.raises(InputError, match="unknown criterion 'nope'"):
        prune_graph(graph, PruneConfig(flops=0.5, criterion="nope"))


def test_example_model_is_unchanged_by_the_suite():
    """Other tests copy or read the bundled example; it must still be a valid model."""
    model = onnx.load(str(EXAMPLE))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]


# --------------------------------------------------------------------------- in-memory copies


def test_copy_without_initializers_matches_a_full_copy_minus_them():
    model = onnx.load(str(EXAMPLE))
    dropped = {t.name for t in model.graph.initializer if t.dims and np.prod(t.dims) > 64}
    assert len(dropped) >= 4
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    kept = [t for t in expected.graph.initializer if t.name not in dropped]
    del expected.graph.initializer[:]
    expected.graph.initializer.extend(kept)
    assert copy_without_initializers(model, dropped).SerializeToString() == expected.SerializeToString()


def test_reference_session_feeds_the_weights_in_place():
    graph = load_model(EXAMPLE)
    session, weights = reference_session(graph)
    assert weights and all(value is graph.constants[name] for name, value in weights.items())
    assert set(weights) <= {i.name for i in session.get_inputs()}
    feeds = spa_compiler.synthetic_inputs(graph.input_shapes, graph.dtypes, seed=3)
    expected = run_model(graph.model, feeds, optimize=False)
    for got, want in zip(session.run(None, {**feeds, **weights}), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_set_constant_changes_the_value_and_the_model():
    graph = load_model(EXAMPLE)
    name = next(t.name for t in graph.model.graph.initializer if len(t.dims) == 4)
    value = np.full(graph.constants[name].shape, 0.25, dtype=np.float32)
    graph.set_constant(name, value)
    assert graph.constants[name] is value
    stored = next(t for t in graph.model.graph.initializer if t.name == name)
    np.testing.assert_array_equal(numpy_helper.to_array(stored), value)


def test_folding_leaves_graphsurgeon_logging_as_it_was(tmp_path):
    """Loading folds a Constant node with graphsurgeon, whose logger is quiet only meanwhile."""
    from onnx_graphsurgeon.logger import G_LOGGER

    weight = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.eye(3, dtype=np.float32)))
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [weight, matmul], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    path = tmp_path / "constant.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    before = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.INFO
    try:
        loaded = load_model(path)
        assert G_LOGGER.severity == G_LOGGER.INFO
    finally:
        G_LOGGER.severity = before
    assert [n.op_type for n in loaded.nodes] == ["MatMul"]
    np.testing.assert_array_equal(loaded.constants["w"], np.eye(3, dtype=np.float32))


def test_outputs_that_are_not_tensors_are_kept(tmp_path):
    """scikit-learn's exports end in a ``ZipMap``: a sequence of maps from class to probability,
    beside the predicted labels. Their probabilities stand in for the maps while the model is
    pruned and measured (the labels count as decisions kept when equal), and the pruned file
    has the same outputs in the same order, the maps made from its own probabilities, as has
    the model ``prune_graph`` returns."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (8, 32)), ("W2", (32, 3)))]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        helper.make_node("ZipMap", ["probabilities"], ["maps"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    maps = helper.make_value_info("maps", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    graph = helper.make_graph(nodes, "sklearn_like", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), maps], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    source, output = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, source)

    loaded = load_model(source, {"X": (1, 8)})
    assert loaded.outputs == ["label", "probabilities"]
    assert [value.name for _, value in loaded.detached_outputs.values] == ["maps"]
    barriers = [(b.op_type, b.reason) for b in spa_compiler.analyze_graph(loaded).barriers]
    assert barriers == [("ZipMap", "op ai.onnx.ml::ZipMap has no pruning rule")]  # a standard domain, not a custom op
    report = prune(source, output, PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert report.fidelity.top1_agreement is not None
    pruned = onnx.load(output)
    onnx.checker.check_model(pruned, full_check=True)
    assert [value.name for value in pruned.graph.output] == ["label", "maps"]
    assert pruned.graph.output[1].type.HasField("sequence_type")
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "W1")).shape == (8, 16)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    label, maps_out = ort.InferenceSession(str(output)).run(None, {"X": x})
    assert [max(m, key=m.get) for m in maps_out] == label.tolist()
    in_memory = prune_graph(load_model(source, {"X": (1, 8)}), PruneConfig(ratio=0.5, round_to=1, bench_runs=0)).model
    assert [value.name for value in in_memory.graph.output] == ["label", "maps"]  # the last pass, not the saving
