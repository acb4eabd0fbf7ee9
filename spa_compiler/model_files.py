"""Model files: checking paths, reading a model (with its external data, or streamed) and
writing one atomically, inline or with its weights in a ``.data`` file beside it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import EncodeError, Message

from . import streaming
from .errors import InputError, OutputError
from .proto_copy import copy_field
from .subgraphs import all_initializers, attribute_subgraphs

__all__ = ["check_input_path", "check_output_path", "read_proto", "save_model", "all_tensors", "file_bytes"]


def check_input_path(path: Path) -> None:
    """Fail early when the input model cannot be read."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the path of an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} is not readable; check its permissions")


def read_proto(path: Path, lean: bool = False) -> tuple[onnx.ModelProto, bool]:
    """The parsed model with its external data loaded, and whether it had external data. A model
    with :func:`~spa_compiler.streaming.stream_threshold` bytes of large float weights or more
    (``lean`` as there) is streamed: external data is not loaded, its large tensors stay on disk
    (:func:`~spa_compiler.streaming.read_lazily`); weights inside the protobuf move to a scratch
    data file (:func:`~spa_compiler.streaming.spill_embedded`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning and others
        raise InputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); "
            "check that the file is complete and was exported as ONNX"
        ) from None
    if model.ir_version == 0 or not model.graph.node or not model.opset_import:
        raise InputError(
            f"{path} is not an ONNX model (no graph or opset found); "
            "check that the file is complete and was exported as ONNX"
        )
    uses_external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model.graph)
    )
    streamed = streaming.streamed_bytes(model) >= streaming.stream_threshold(lean)
    if streamed and uses_external:
        streaming.read_lazily(model, path)
    elif streamed:
        model = streaming.spill_embedded(model)
    elif uses_external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise InputError(
                f"{path}: its external weight data could not be read ({exc}); "
                "keep the .data file next to the model"
            ) from None
    return model, uses_external


def all_tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers, then those of node attributes and subgraphs."""
    yield from graph.initializer
    yield from _node_tensors(graph)


def _node_tensors(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in attribute_subgraphs(attr):
                yield from all_tensors(sub)


def check_output_path(path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Fail early, before any work, when the output cannot be written (or is the input)."""
    path = Path(path)
    if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
        raise OutputError(f"output {path} is the input model; give another path with -o (the input is never modified)")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {path}: the file exists and is read-only")
    return path


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool = False) -> Path:
    """Write ``model`` atomically: to a temporary file beside ``path``, then renamed into place.

    Models too large for one protobuf, or when ``external_data`` is asked, keep their weights in
    ``<name>.data`` beside the model, written atomically too, one tensor at a time. Otherwise
    streamed weights (:mod:`spa_compiler.streaming`) are written inside the model. ``model``
    itself is left as it was, so it can still be run or saved again.
    """
    path = check_output_path(path)
    streamed = streaming.has_external(model)
    inline = None if external_data or streamed else _serialized(model)
    external = external_data or (_inline_bytes(model) > streaming.PROTOBUF_SAFE_BYTES if streamed else inline is None)
    data_name = path.name + ".data"
    tmp = tmp_data = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        if external:
            tmp_data = str(path.parent / f".{data_name}.tmp")
            _save_with_external_data(model, tmp, tmp_data, data_name)
            os.replace(tmp_data, path.parent / data_name)
        elif inline is not None:
            _write(tmp, inline)
        else:
            with open(tmp, "wb") as file:
                write_embedded(model, file)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
    return path


def file_bytes(path: str | os.PathLike) -> int:
    """The bytes of the model at ``path`` on disk: its file and the external data files its
    tensors refer to (not a ``<name>.data`` an earlier model left beside it)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in all_initializers(model.graph) if streaming.is_external(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    data = [path.parent / location for location in locations]
    return path.stat().st_size + sum(file.stat().st_size for file in data if file.exists())


def _inline_bytes(model: onnx.ModelProto) -> int:
    """About the size a model with streamed tensors would have with them inside."""
    return model.ByteSize() + streaming.external_bytes(model)


def write_embedded(model: onnx.ModelProto, file: BinaryIO) -> None:
    """Write ``model`` with its streamed tensors' values inside the protobuf, one tensor at a
    time. The bytes are those of serialising the whole model with the values in place (protobuf
    writes fields in number order: the model's fields before ``graph`` (7), the graph's before
    ``initializer`` (5), each initializer, then the rest), without holding the model's weights."""
    graph = model.graph
    if any(streaming.is_external(t) for t in _node_tensors(graph)):
        raise OutputError("internal error: a streamed tensor lies outside the main graph; nothing was written")
    head, tail = _split_fields(model, "graph")
    graph_head, graph_tail = _split_fields(graph, "initializer")
    sizes = [_embedded_size(t) for t in graph.initializer]
    entries = sum(1 + _varint_size(n) + n for n in sizes)
    file.write(head)
    file.write(_key(GRAPH_FIELD) + _varint(len(graph_head) + entries + len(graph_tail)))
    file.write(graph_head)
    for tensor, size in zip(graph.initializer, sizes):
        data = _embedded_tensor(tensor).SerializeToString()
        if len(data) != size:
            raise OutputError(f"internal error: tensor '{tensor.name}' serialised to an unexpected size; nothing was written")
        file.write(_key(INITIALIZER_FIELD) + _varint(size))
        file.write(data)
        del data
    file.write(graph_tail)
    file.write(tail)


GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def _split_fields(message: Message, field: str) -> tuple[bytes, bytes]:
    """The serialised fields of ``message`` numbered below ``field``'s and above it."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    before, after = type(message)(), type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.number != number:
            copy_field(before if descriptor.number < number else after, descriptor, value)
    return before.SerializeToString(), after.SerializeToString()


def _embedded_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor with its values inside (a streamed one read from its file)."""
    if not streaming.is_external(tensor):
        return tensor
    inside = onnx.TensorProto()
    inside.CopyFrom(tensor)
    inside.ClearField("external_data")
    inside.ClearField("data_location")
    inside.raw_data = streaming.tensor_view(tensor).tobytes()
    return inside


def _embedded_size(tensor: onnx.TensorProto) -> int:
    """Serialised bytes of :func:`_embedded_tensor`, computed without reading the values."""
    if not streaming.is_external(tensor):
        return tensor.ByteSize()
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    header.ClearField("external_data")
    header.ClearField("data_location")
    n = streaming.byte_count(tensor)
    return header.ByteSize() + len(_key(RAW_DATA_FIELD)) + _varint_size(n) + n


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_size(value: int) -> int:
    return len(_varint(value))


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when they would not fit one protobuf (over
    :data:`~spa_compiler.streaming.PROTOBUF_SAFE_BYTES`)."""
    try:
        data = model.SerializeToString()
    except EncodeError:  # protobuf refuses messages over 2 GiB
        return None
    return data if len(data) <= streaming.PROTOBUF_SAFE_BYTES else None


_EXTERNAL_MIN_BYTES = 1024


def _save_with_external_data(model: onnx.ModelProto, header_path: str, data_path: str, location: str) -> None:
    """Write every tensor of at least 1 KiB to ``data_path`` and the rest of the model to
    ``header_path``, the tensors referring to ``location`` (the data file's final name).

    Tensors are moved out one at a time (streamed ones read from their files) and put back
    afterwards, so ``model`` ends unchanged and no second copy of the weights is made.
    """
    moved: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    try:
        with open(data_path, "wb") as stream:
            data = streaming.DataFile(stream, location)
            for tensor in all_tensors(model.graph):
                external = streaming.is_external(tensor)
                if not external and len(tensor.raw_data) < _EXTERNAL_MIN_BYTES:
                    continue
                before = onnx.TensorProto()
                before.CopyFrom(tensor)  # for an in-memory tensor, a copy of one tensor's bytes at a time
                value = streaming.tensor_view(tensor) if external else tensor.raw_data
                data.append(tensor, value)
                del value
                moved.append((tensor, before))
        with open(header_path, "wb") as header:
            header.write(model.SerializeToString())
    finally:
        for tensor, before in moved:
            tensor.CopyFrom(before)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
