"""Model files: checking paths, reading a model (with its external data, or streamed) and
writing one atomically, inline or with its weights in a ``.data`` file beside it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError

from . import streaming
from .errors import InputError, OutputError
from .subgraphs import attribute_subgraphs

__all__ = ["check_input_path", "check_output_path", "read_proto", "save_model", "all_tensors"]


def check_input_path(path: Path) -> None:
    """Fail early when the input model cannot be read."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give the path of an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path} is not readable; check its permissions")


def read_proto(path: Path) -> tuple[onnx.ModelProto, bool]:
    """The parsed model with its external data loaded, and whether it had external data. External
    data of :func:`~spa_compiler.streaming.stream_threshold` bytes or more is not loaded: its large
    tensors stay on disk (:func:`~spa_compiler.streaming.read_lazily`)."""
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
    if uses_external and streaming.external_bytes(model) >= streaming.stream_threshold():
        streaming.read_lazily(model, path)
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
    yield from graph.initializer
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

    Models too large for one protobuf, with streamed weights (:mod:`spa_compiler.streaming`), or
    when ``external_data`` is asked keep their weights in ``<name>.data`` beside the model, written
    atomically too, one tensor at a time. ``model`` itself is left as it was, so it can still be
    run or saved again.
    """
    path = check_output_path(path)
    external = external_data or any(streaming.is_external(t) for t in all_tensors(model.graph))
    inline = None if external else _serialized(model)
    external = inline is None
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
        else:
            _write(tmp, inline)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
    return path


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
