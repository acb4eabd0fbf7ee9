"""Models whose weights stay on disk: read memory-mapped, written tensor by tensor.

A protobuf message cannot exceed 2 GiB, and a model held both as a protobuf and as arrays takes
its weights' memory twice. So a model with at least :func:`stream_threshold` bytes of large float
tensors (1.8 GB; 64 MB when pruned file to file, as the CLI and :func:`~spa_compiler.api.prune` do;
the environment variable ``SPA_PRUNE_STREAM_BYTES`` sets it, e.g. to test this path on small
models) keeps those tensors (the ones :func:`~spa_compiler.shapes.shape_skeleton` strips: more than
64 elements) *external*: the ModelProto keeps only their name, type, shape and
a reference ``(location, offset, length)`` whose location is made absolute, so the proto is a few
megabytes whatever the model's size. External data stays in its files; a model with its weights
inside the protobuf has them copied to a scratch data file once (:func:`spill_embedded`). Their
values are read on demand:

* :func:`tensor_view` maps one tensor's bytes read-only (``numpy.memmap``); the pages are read
  when touched and given back when the array is freed, so reading every weight once (magnitude
  scores, slicing) costs one tensor's memory at a time, not the model's;
* :class:`TensorValues` is the ``Graph.constants`` mapping over such a proto;
* :func:`header_file` writes the weightless proto beside its data file, for onnxruntime to read
  the weights from disk itself (as little memory as any session of the model takes); where that
  folder is not writable, :func:`session_weights` hands the mapped tensors to onnxruntime as
  external initializers instead (which it copies);
* :class:`DataFile` appends tensors to a data file (page-aligned, as runtimes memory-map it) and
  points their protos at it: the rewriter streams the sliced weights of a pruned model there,
  and :func:`~spa_compiler.model_files.save_model` copies them into the output's ``.data`` file one at a time.

For models of :data:`CHUNKED_STATISTICS_FROM` bytes of streamed weights or more, second-order
statistics (Gram matrices ``H`` of every consumer layer, float64, together often larger than the
weights) are collected in chunks of layers (:func:`statistics_chunks`) and kept on disk with
their inverses (:func:`spilled`), so that they too take a fraction of the model's size in memory.

Inside the process an external tensor's location is absolute; :func:`check_model` runs the ONNX
checker (which refuses absolute locations) on :func:`header_file`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InputError
from .subgraphs import all_initializers, walk_nodes

if TYPE_CHECKING:
    from .ir import Graph

__all__ = [
    "STREAM_ENV", "PROTOBUF_SAFE_BYTES", "stream_threshold", "is_external", "external_bytes", "read_lazily",
    "tensor_view", "TensorValues", "tensor_values", "replacing", "session_weights", "DataFile", "scratch_file",
    "header_file", "has_external", "check_model", "fold_without_weights", "spilled", "remapped", "statistics_chunks",
    "streamed_bytes", "spill_embedded", "byte_count", "tensor_value",
]

STREAM_ENV = "SPA_PRUNE_STREAM_BYTES"
STREAM_BYTES = 64_000_000  # large float weights from which a model pruned file to file is streamed
PROTOBUF_SAFE_BYTES = 1_800_000_000  # protobuf cannot hold a model over 2 GiB
CHUNKED_STATISTICS_FROM = PROTOBUF_SAFE_BYTES  # streamed weights from which statistics are chunked
_LAZY_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_LAZY_MIN_ELEMENTS = 65  # as shapes.shape_skeleton: smaller tensors may hold shapes and are loaded
ALIGNMENT = 4096  # page-aligned offsets let runtimes memory-map the weights


def stream_threshold(lean: bool = False) -> int:
    """Bytes of large float weights from which a model is streamed (``SPA_PRUNE_STREAM_BYTES``):
    ``STREAM_BYTES`` when ``lean`` (a model pruned from file to file, whose proto only this
    package writes), else only what one protobuf cannot hold."""
    value = os.environ.get(STREAM_ENV, "")
    if not value:
        return STREAM_BYTES if lean else PROTOBUF_SAFE_BYTES
    if not value.isdigit():
        raise InputError(f"{STREAM_ENV}={value!r} is not a number of bytes; unset it or give e.g. 1000000")
    return int(value)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _reference(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


_VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _set_reference(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in _VALUE_FIELDS:  # the values now live in the file only
        tensor.ClearField(field)
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def byte_count(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all external tensor data the model refers to."""
    return sum(byte_count(t) for t in all_initializers(model.graph) if is_external(t))


def _lazy(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _LAZY_TYPES and int(np.prod(tensor.dims, dtype=np.int64)) >= _LAZY_MIN_ELEMENTS


def streamed_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors streaming would keep external (large float ones), wherever they are."""
    return sum(byte_count(t) for t in all_initializers(model.graph) if _lazy(t))


def spill_embedded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (weights inside the protobuf) with its large float initializers moved to a
    scratch data file, one at a time: a new proto, so that the old one's memory can go."""
    path = scratch_file(".data")
    with open(path, "wb") as stream:
        data = DataFile(stream, str(path))
        for tensor in all_initializers(model.graph):
            if _lazy(tensor) and not is_external(tensor):
                data.append(tensor, numpy_helper.to_array(tensor))
    weightless = onnx.ModelProto()
    weightless.CopyFrom(model)
    return weightless


def read_lazily(model: onnx.ModelProto, path: Path) -> None:
    """Prepare a model read from ``path`` without its external data: small external tensors
    (shape constants, norms of few elements) are loaded into the proto; large float ones stay
    external, their location made absolute; every reference is checked to lie within a file in
    the model's folder."""
    base_dir = path.parent.resolve()
    for tensor in all_initializers(model.graph):
        if not is_external(tensor):
            continue
        reference = _reference(tensor)
        location = base_dir / reference.get("location", "")
        if not location.is_file() or base_dir not in location.resolve().parents:
            raise InputError(
                f"{path}: tensor '{tensor.name}': its external data file '{reference.get('location')}' is missing; "
                "keep the .data file next to the model"
            )
        offset, length = int(reference.get("offset", 0)), int(reference.get("length", byte_count(tensor)))
        if length != byte_count(tensor) or offset + length > location.stat().st_size:
            raise InputError(
                f"{path}: tensor '{tensor.name}': its external data ({length} bytes at {offset} in "
                f"'{location.name}') does not fit its shape or the file; the .data file is truncated or belongs "
                "to another model"
            )
        if _lazy(tensor):
            _set_reference(tensor, str(location), offset, length)
        else:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))


def tensor_view(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an external tensor, memory-mapped read-only from its data file."""
    reference = _reference(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
    return np.memmap(reference["location"], dtype=dtype, mode="r", offset=int(reference.get("offset", 0)),
                     shape=tuple(tensor.dims))


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of any tensor: memory-mapped when streamed, else read from the proto (never
    loading external data into it, as ``numpy_helper.to_array`` would)."""
    return tensor_view(tensor) if is_external(tensor) else numpy_helper.to_array(tensor)


class TensorValues(MutableMapping):
    """Constant values by name: arrays held in memory, and external tensors mapped from their
    files each time they are looked up (so a value's pages live only as long as the caller keeps
    it). A value set replaces the file's."""

    def __init__(self, arrays: dict[str, np.ndarray], external: dict[str, onnx.TensorProto]) -> None:
        self.arrays = arrays
        self.external = external

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.arrays:
            return self.arrays[name]
        return tensor_view(self.external[name])

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.external.pop(name, None)
        self.arrays[name] = value

    def __delitem__(self, name: str) -> None:
        if self.external.pop(name, None) is None:
            del self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays or name in self.external

    def __iter__(self) -> Iterator[str]:
        yield from self.arrays
        yield from self.external

    def __len__(self) -> int:
        return len(self.arrays) + len(self.external)


def tensor_values(graph: onnx.GraphProto) -> TensorValues:
    """The values of the initializers of ``graph`` and its subgraphs: streamed ones mapped on
    demand, the others read into arrays."""
    tensors = list(all_initializers(graph))
    return TensorValues(
        {t.name: numpy_helper.to_array(t) for t in tensors if not is_external(t)},
        {t.name: t for t in tensors if is_external(t)},
    )


@contextlib.contextmanager
def replacing(tensors: list[onnx.TensorProto]) -> Iterator[Callable[[onnx.TensorProto, np.ndarray], None]]:
    """A function giving one of ``tensors`` a new value (any shape): in the proto, or for a
    streamed tensor appended to a new scratch data file (:func:`scratch_file`), one at a time."""
    path = scratch_file(".data") if any(is_external(t) for t in tensors) else None
    with open(path, "wb") if path else contextlib.nullcontext() as stream:

        def replace(tensor: onnx.TensorProto, value: np.ndarray) -> None:
            if is_external(tensor):
                DataFile(stream, str(path)).append(tensor, value)
            else:
                tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

        yield replace


def session_weights(model: onnx.ModelProto) -> tuple[list[str], list[np.ndarray]]:
    """Names and memory-mapped values of the model's external initializers (all in the main
    graph, where :func:`~spa_compiler.subgraphs.hoist_initializers` put them), for
    ``SessionOptions.add_external_initializers``."""
    external = [t for t in model.graph.initializer if is_external(t)]
    return [t.name for t in external], [tensor_view(t) for t in external]


class DataFile:
    """Tensors appended one by one to a data file at page-aligned offsets."""

    def __init__(self, stream: BinaryIO, location: str) -> None:
        self.stream = stream
        self.location = location

    def append(self, tensor: onnx.TensorProto, value: np.ndarray | bytes) -> None:
        """Write ``value`` (an array of the tensor's type, which gives the tensor its shape, or
        the tensor's raw bytes) and point ``tensor`` at it."""
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value, helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<"))
            del tensor.dims[:]
            tensor.dims.extend(value.shape)
            value = memoryview(value.reshape(-1)).cast("B")
        offset = -(-self.stream.tell() // ALIGNMENT) * ALIGNMENT
        self.stream.write(b"\0" * (offset - self.stream.tell()))
        self.stream.write(value)
        _set_reference(tensor, self.location, offset, len(value))


_scratch: list[str] = []


def scratch_file(suffix: str) -> Path:
    """A new empty file in this process's scratch directory (removed when the process ends),
    where pruned models keep their streamed weights until they are saved."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="spa-prune-"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=_scratch[0])
    os.close(fd)
    return Path(name)


def spilled(array: np.ndarray) -> np.ndarray:
    """``array`` written to a scratch file and mapped back read-only: its pages leave memory when
    the caller lets go of what it read."""
    path = scratch_file(".npy")
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def remapped(spilled_array: np.ndarray | str) -> np.ndarray:
    """A fresh read-only mapping of a :func:`spilled` array (or its file): none of its pages in
    memory yet, while the old mapping's go back when its last reader lets go."""
    path = spilled_array if isinstance(spilled_array, str) else str(spilled_array.filename)
    return np.load(path, mmap_mode="r")


def statistics_chunks(graph: "Graph", layers: list, sizes: list[int]) -> list[list]:
    """``layers`` (with the byte sizes of their statistics) in consecutive chunks whose statistics
    take at most a quarter of the model's streamed weights (a larger layer alone): one chunk for
    a model under :data:`CHUNKED_STATISTICS_FROM` bytes of streamed weights, or when all fit."""
    streamed = external_bytes(graph.model)
    budget = streamed // 4
    if not budget or streamed < CHUNKED_STATISTICS_FROM or sum(sizes) <= budget:
        return [list(layers)]
    chunks: list[list] = [[]]
    used = 0
    for layer, size in zip(layers, sizes):
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(layer)
        used += size
    return chunks


@contextlib.contextmanager
def header_file(model: onnx.ModelProto) -> Iterator[Path]:
    """``model`` written without its weights into the folder of its streamed data files (a
    temporary file, removed on exit), external locations relative to it: what onnxruntime and the
    ONNX checker read, since they refuse absolute locations and data outside the model's folder."""
    external = [t for t in all_initializers(model.graph) if is_external(t)]
    folder = os.path.commonpath([os.path.dirname(_reference(t)["location"]) for t in external])
    header = onnx.ModelProto()
    header.CopyFrom(model)
    for tensor in all_initializers(header.graph):
        for entry in tensor.external_data:
            if is_external(tensor) and entry.key == "location":
                entry.value = os.path.relpath(entry.value, folder)
    fd, name = tempfile.mkstemp(prefix=".spa-prune-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(header.SerializeToString())
        yield Path(name)
    finally:
        os.unlink(name)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in all_initializers(model.graph))


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model``, on :func:`header_file` when the model has streamed weights."""
    if not has_external(model):
        onnx.checker.check_model(model)
        return
    with header_file(model) as header:
        onnx.checker.check_model(str(header))


def fold_without_weights(model: onnx.ModelProto, fold) -> onnx.ModelProto:
    """``fold(model)`` run with the external tensors turned into graph inputs, then put back:
    constant subgraphs of shapes and small constants fold; a node reading a streamed weight
    stays (folding it would load the weight)."""
    external = [t for t in model.graph.initializer if is_external(t)]
    if not external:
        return fold(model)
    names = {t.name for t in external}
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    kept = [t for t in skeleton.graph.initializer if t.name not in names]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    listed = {i.name for i in skeleton.graph.input}
    skeleton.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external if t.name not in listed
    )
    folded = fold(skeleton)
    if folded is skeleton:
        return model
    was_listed = {i.name for i in model.graph.input}
    inputs = [i for i in folded.graph.input if i.name not in names or i.name in was_listed]
    del folded.graph.input[:]
    folded.graph.input.extend(inputs)
    used = {name for node in walk_nodes(folded.graph) for name in node.input} | {o.name for o in folded.graph.output}
    folded.graph.initializer.extend(t for t in external if t.name in used)
    return folded
