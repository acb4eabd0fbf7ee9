"""Models beyond 2 GB: weights memory-mapped, never in a protobuf, written tensor by tensor.

The path a 4 GB model takes is forced on an 18 MB Llama-style dynamo export by lowering the
streaming threshold (``SPA_PRUNE_STREAM_BYTES``); the same model pruned in memory is the reference.
"""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from spa_compiler import PruneConfig, PruneState, criteria, load_model, prune, streaming
from spa_compiler.api import default_passes, output_passes
from spa_compiler.errors import InputError
from spa_compiler.stages import Load
from spa_compiler.verify import session_for
from spa_compiler.streaming import STREAM_ENV

SMALL_LLAMA = dict(hidden=256, layers=3, intermediate=1024, vocab=3000, heads=4, kv_heads=2)  # 18 MB


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from models.large_benchmark import export_llama

    return export_llama(tmp_path_factory.mktemp("llama") / "llama.onnx", **SMALL_LLAMA)


def weight_bytes(path) -> int:
    return (path.parent / f"{path.name}.data").stat().st_size


def run(path, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, SMALL_LLAMA["vocab"], (1, 16))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]


def signature(values) -> list:
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def test_streamed_model_keeps_its_weights_on_disk(llama, monkeypatch):
    monkeypatch.setenv(STREAM_ENV, str(weight_bytes(llama) - 1))
    graph = load_model(llama)
    mapped = {name: graph.constants[name] for name in graph.constants if isinstance(graph.constants[name], np.memmap)}
    regions = {(array.filename, array.offset) for array in mapped.values()}  # the norms' copies read one vector
    assert len(regions) == 3 * 7 + 6  # q, k, v, o, gate, up, down per layer; embedding, lm head, norm, rotary, mask
    assert sum(v.nbytes for v in mapped.values()) > 0.99 * weight_bytes(llama)
    inline = [t for t in graph.model.graph.initializer if t.raw_data]  # shape constants (copied per reader), scalars
    assert all(len(t.dims) <= 1 for t in inline) and sum(len(t.raw_data) for t in inline) < 2000
    monkeypatch.setenv(STREAM_ENV, str(weight_bytes(llama) + 1))  # below the threshold: read into memory
    assert not any(isinstance(v, np.memmap) for v in load_model(llama).constants.values())


def pruned_with_peaks(source, output, config) -> tuple[object, dict[str, int]]:
    """Prune file to file, pass by pass, and the peak bytes Python and numpy allocated during each
    pass that reads weights (tracemalloc; memory-mapped pages and onnxruntime's own buffers are
    not counted). The analysis, whose memory grows with the activations' channels and not with
    the weights, runs untraced (tracing makes it slow)."""
    state = PruneState(config, source=source)
    peaks = {}
    for step in [Load(), *default_passes(config), *output_passes(config, output)]:
        if step.name == "analyse":
            state = step(state)
            continue
        tracemalloc.start()
        try:
            state = step(state)
            peaks[step.name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return state.report, peaks


def test_streamed_pruning_matches_pruning_in_memory(llama, tmp_path, monkeypatch):
    """--flops 0.5: the same weights, outputs and interface, the ONNX checker's full check on the
    files written, and the weights never all in memory."""
    config = PruneConfig(flops=0.5, bench_runs=0)
    monkeypatch.setattr(criteria, "_BLOCK_ELEMENTS", 1 << 14)  # scored in blocks, as a 1B model's weights are
    in_memory, memory_peaks = pruned_with_peaks(llama, tmp_path / "memory.onnx", config)
    monkeypatch.setenv(STREAM_ENV, "0")
    streamed, streamed_peaks = pruned_with_peaks(llama, tmp_path / "streamed.onnx", config)
    assert streamed.flops_ratio == in_memory.flops_ratio and 0.45 <= streamed.flops_ratio <= 0.5
    assert memory_peaks["load"] > weight_bytes(llama)  # in memory every weight is read into an array
    assert max(streamed_peaks.values()) < 0.25 * weight_bytes(llama)  # streamed, one tensor at a time
    onnx.checker.check_model(str(tmp_path / "streamed.onnx"), full_check=True)
    original, pruned = onnx.load(llama), onnx.load(tmp_path / "streamed.onnx")
    assert signature(pruned.graph.input) == signature(original.graph.input)
    assert signature(pruned.graph.output) == signature(original.graph.output)
    reference = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "memory.onnx").graph.initializer}
    for tensor in pruned.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), reference.pop(tensor.name))
    assert not reference
    np.testing.assert_allclose(run(tmp_path / "streamed.onnx"), run(tmp_path / "memory.onnx"), rtol=0, atol=1e-6)


def test_read_only_folder_hands_mapped_weights_to_onnxruntime(llama, monkeypatch):
    """Where no header can be written beside the data file, the session takes the weights as
    external initializers; its outputs are those of the model opened from its file."""
    monkeypatch.setenv(STREAM_ENV, "0")
    graph = load_model(llama)

    def read_only(model):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(streaming, "header_file", read_only)
    ids = np.random.default_rng(0).integers(0, SMALL_LLAMA["vocab"], (1, 16))
    np.testing.assert_allclose(session_for(graph.model).run(None, {"input_ids": ids})[0], run(llama), rtol=0, atol=1e-5)


def test_truncated_weights_are_refused(llama, tmp_path, monkeypatch):
    monkeypatch.setenv(STREAM_ENV, "0")
    copy = tmp_path / "copy.onnx"
    shutil.copy(llama, copy)
    data = (llama.parent / f"{llama.name}.data").read_bytes()
    (tmp_path / f"{llama.name}.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or belongs to another model"):
        load_model(copy)


def test_streamed_model_with_constant_nodes_folds_without_its_weights(tmp_path, monkeypatch):
    """A Constant node (folded into an initializer at load) beside streamed weights."""
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"]),
            helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, 8], np.int64))),
            helper.make_node("Reshape", ["z", "shape"], ["y"]),
        ],
        "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )
    source = tmp_path / "mlp.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source),
                    save_as_external_data=True, location="mlp.onnx.data", size_threshold=0)
    monkeypatch.setenv(STREAM_ENV, "0")
    loaded = load_model(source)
    assert isinstance(loaded.constants["w1"], np.memmap) and loaded.constants["shape"].tolist() == [1, 8]
    report = prune(source, tmp_path / "half.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert report.flops_ratio == pytest.approx(0.5)
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "half.onnx").graph.initializer}
    kept = np.sort(np.argsort(-np.sqrt((first ** 2).sum(0) + (second ** 2).sum(1)))[:16])  # L2 of both slabs
    np.testing.assert_array_equal(pruned["w1"], first[:, kept])
    np.testing.assert_array_equal(pruned["w2"], second[kept])


def test_second_order_statistics_of_a_streamed_model_are_collected_in_chunks(llama, tmp_path, monkeypatch):
    """Gram matrices of 22 layers (3 x (6 x 257² + 1025²) + 257² float64: 35 MB) against 18 MB of
    weights: streamed, they are collected a quarter of the weights' size at a time and kept on
    disk, as are their inverses; every token row is used here, so the matrices, and the pruned
    weights, are those of the collection in memory. (The prior's token ids: the 28 sequences the
    model would write are topped up with copies, whose rows this bound does not count.)"""
    config = PruneConfig(flops=0.5, bench_runs=0, criterion="obs", calibration_samples=32, self_written=False)
    grams = 8 * (3 * (6 * 257**2 + 1025**2) + 257**2)
    in_memory = prune(llama, tmp_path / "memory.onnx", config)
    monkeypatch.setenv(STREAM_ENV, "0")
    monkeypatch.setattr(streaming, "CHUNKED_STATISTICS_FROM", 0)  # chunked as a model over 1.8 GB is
    streamed, peaks = pruned_with_peaks(llama, tmp_path / "streamed.onnx", config)
    for name in ("calibrate", "score", "compensate"):  # one chunk's matrices, one layer's rows and inverse
        assert peaks[name] < 0.8 * grams, name
    reference = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "memory.onnx").graph.initializer}
    for tensor in onnx.load(tmp_path / "streamed.onnx").graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(tensor), reference.pop(tensor.name), rtol=1e-5, atol=1e-6)
    assert not reference and streamed.flops_ratio == in_memory.flops_ratio


def test_embedded_model_over_the_threshold_is_pruned_from_disk_and_written_inline(tmp_path, monkeypatch):
    """A model with its weights inside the protobuf, over the streaming threshold: the weights
    move to a scratch data file at load (the graph's proto holds none of them), and the pruned
    model is written inline, byte for byte the one pruning in memory writes."""
    source = Path(__file__).resolve().parents[1] / "models" / "examples" / "mini_resnet.onnx"
    config = PruneConfig(flops=0.5, bench_runs=0)
    prune(source, tmp_path / "memory.onnx", config)
    monkeypatch.setenv(STREAM_ENV, "0")
    graph = load_model(source)
    assert all(streaming.is_external(t) for t in graph.model.graph.initializer if t.dims and np.prod(t.dims) > 64)
    assert graph.model.ByteSize() < 0.2 * source.stat().st_size
    prune(source, tmp_path / "streamed.onnx", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.onnx", "streamed.onnx"]
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "memory.onnx").read_bytes()


def test_only_file_to_file_pruning_streams_a_mid_size_model(monkeypatch):
    """Under the 1.8 GB a protobuf holds, ``load_model`` keeps the weights in the proto (callers
    may ``onnx.save`` it); ``lean=True``, as the Load pass of file-to-file pruning asks, streams
    them from ``STREAM_BYTES`` on."""
    source = Path(__file__).resolve().parents[1] / "models" / "examples" / "mini_resnet.onnx"
    monkeypatch.delenv(STREAM_ENV, raising=False)
    monkeypatch.setattr(streaming, "STREAM_BYTES", 1000)
    assert not streaming.has_external(load_model(source).model)
    assert streaming.has_external(load_model(source, lean=True).model)


def test_spilled_tensors_stored_as_float_data_keep_one_value_field(tmp_path, monkeypatch):
    """Exporters may store a tensor's values in ``float_data`` rather than ``raw_data`` (onnxruntime's
    quantizer does for scales): once moved to the data file, the proto keeps no value field, and the
    values read back are the stored ones."""
    values = np.arange(2 * 50, dtype=np.float32).reshape(2, 50) / 7
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [2, 50], values.ravel().tolist())  # float_data
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"]), helper.make_node("Transpose", ["w"], ["wt"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 50])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    monkeypatch.delenv(STREAM_ENV, raising=False)
    monkeypatch.setattr(streaming, "STREAM_BYTES", 0)
    loaded = load_model(path, lean=True)
    tensor = next(t for t in loaded.model.graph.initializer if t.name == "w")
    assert streaming.is_external(tensor) and not tensor.float_data and not tensor.raw_data
    np.testing.assert_array_equal(loaded.constants["w"], values)
