"""Where an ONNX file keeps its initializers' bytes, read from the protobuf wire format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa_compiler import load_model, streaming
from spa_compiler.proto_offsets import initializer_offsets

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "mini_resnet.onnx"


def test_offsets_point_at_every_initializers_bytes():
    model = onnx.load(EXAMPLE)
    raw = [t for t in model.graph.initializer if t.raw_data]
    offsets = initializer_offsets(EXAMPLE, raw)
    assert len(raw) > 10 and set(offsets) == {t.name for t in raw}
    content = EXAMPLE.read_bytes()
    for tensor in raw:
        offset, length = offsets[tensor.name]
        assert content[offset:offset + length] == tensor.raw_data


def _two_weights(path: Path, first: np.ndarray, second: np.ndarray, names=("a", "b")) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", list(names), ["y"])], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [80])],
        [numpy_helper.from_array(first, names[0]), numpy_helper.from_array(second, names[1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return model


def test_a_name_stored_twice_or_bytes_that_differ_give_no_offset(tmp_path):
    values = np.arange(80, dtype=np.float32)
    model = _two_weights(tmp_path / "twice.onnx", values, values + 1, names=("w", "w"))
    assert initializer_offsets(tmp_path / "twice.onnx", model.graph.initializer) == {}
    model = _two_weights(tmp_path / "changed.onnx", values, values + 1)
    changed = onnx.TensorProto()
    changed.CopyFrom(model.graph.initializer[1])
    changed.raw_data = (values + 2).tobytes()  # the file holds other bytes now
    assert list(initializer_offsets(tmp_path / "changed.onnx", [model.graph.initializer[0], changed])) == ["a"]


def test_a_file_that_is_no_protobuf_gives_no_offsets(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x3a\xff\xff\xff\x0f" + b"\0" * 64)  # field 7, a length past the end
    tensor = numpy_helper.from_array(np.zeros(80, np.float32), "w")
    assert initializer_offsets(path, [tensor]) == {}


def test_a_streamed_embedded_model_refers_to_its_own_file(tmp_path, monkeypatch):
    """Its large weights stay where the file holds them: nothing is copied at load, the values
    read back are the stored ones."""
    monkeypatch.setenv(streaming.STREAM_ENV, "0")
    graph = load_model(EXAMPLE)
    external = [t for t in graph.model.graph.initializer if streaming.is_external(t)]
    assert external and {streaming._reference(t)["location"] for t in external} == {str(EXAMPLE.resolve())}
    for tensor in onnx.load(EXAMPLE).graph.initializer:
        np.testing.assert_array_equal(np.asarray(graph.constants[tensor.name]), numpy_helper.to_array(tensor))
