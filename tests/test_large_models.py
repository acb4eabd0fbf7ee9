"""Models beyond 2 GB: weights memory-mapped, never in a protobuf, written tensor by tensor.

The path a 4 GB model takes is forced on a 27 MB Llama-style dynamo export by lowering the
streaming threshold (``SPA_PRUNE_STREAM_BYTES``); the same model pruned in memory is the reference.
"""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from spa_compiler import PruneConfig, load_model, prune
from spa_compiler.errors import InputError
from spa_compiler.streaming import STREAM_ENV

pytest.importorskip("transformers")

SMALL_LLAMA = dict(hidden=256, layers=6, intermediate=1024, vocab=2000, heads=4, kv_heads=2)  # 27 MB


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
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
    assert len(mapped) == 6 * 7 + 6  # q, k, v, o, gate, up, down per layer; embedding, lm head, norm, rotary, mask
    assert sum(v.nbytes for v in mapped.values()) > 0.99 * weight_bytes(llama)
    assert sum(len(t.raw_data) for t in graph.model.graph.initializer) < 1000  # shape constants only
    monkeypatch.setenv(STREAM_ENV, str(weight_bytes(llama) + 1))  # below the threshold: read into memory
    assert not any(isinstance(v, np.memmap) for v in load_model(llama).constants.values())


def traced_peak(run) -> tuple[object, int]:
    """``run()`` and the peak bytes Python and numpy allocated meanwhile (memory-mapped pages and
    onnxruntime's own buffers are not counted)."""
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_pruning_matches_pruning_in_memory(llama, tmp_path, monkeypatch):
    """--flops 0.5: the same weights, outputs and interface, the ONNX checker's full check on the
    files written, and the weights never all in memory."""
    config = PruneConfig(flops=0.5, bench_runs=0)
    in_memory, memory_peak = traced_peak(lambda: prune(llama, tmp_path / "memory.onnx", config))
    monkeypatch.setenv(STREAM_ENV, "0")
    streamed, streamed_peak = traced_peak(lambda: prune(llama, tmp_path / "streamed.onnx", config))
    assert streamed.flops_ratio == in_memory.flops_ratio and 0.45 <= streamed.flops_ratio <= 0.5
    # in memory every weight is read into an array; streamed, one tensor at a time (what remains
    # is the analysis, which grows with the activations' channels, not with the weights)
    assert streamed_peak < memory_peak - weight_bytes(llama)
    onnx.checker.check_model(str(tmp_path / "streamed.onnx"), full_check=True)
    original, pruned = onnx.load(llama), onnx.load(tmp_path / "streamed.onnx")
    assert signature(pruned.graph.input) == signature(original.graph.input)
    assert signature(pruned.graph.output) == signature(original.graph.output)
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "memory.onnx").graph.initializer}
    for tensor in pruned.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), reference.pop(tensor.name))
    assert not reference
    np.testing.assert_allclose(run(tmp_path / "streamed.onnx"), run(tmp_path / "memory.onnx"), rtol=0, atol=1e-6)


def test_truncated_weights_are_refused(llama, tmp_path, monkeypatch):
    monkeypatch.setenv(STREAM_ENV, "0")
    copy = tmp_path / "copy.onnx"
    shutil.copy(llama, copy)
    data = (llama.parent / f"{llama.name}.data").read_bytes()
    (tmp_path / f"{llama.name}.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or belongs to another model"):
        load_model(copy)
