"""Where an ONNX file keeps each initializer's bytes: ``(offset, length)`` of the ``raw_data`` of
the main graph's initializers, read from the protobuf wire format without parsing the values.

A model with its weights inside the protobuf can then refer to them in its own file, as external
data does to a ``.data`` file, instead of copying them elsewhere
(:func:`~spa_compiler.streaming.spill_embedded`). The wire format: every field is a varint key
``number << 3 | wire type``, then a varint (type 0), 8 bytes (type 1), a varint length and that
many bytes (type 2: messages, strings, bytes, packed arrays) or 4 bytes (type 5). ``ModelProto``
holds the graph in field 7, ``GraphProto`` its initializers in field 5, ``TensorProto`` its name
in field 8 and its bytes in field 9.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

__all__ = ["initializer_offsets"]

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_NAME, TENSOR_RAW_DATA = 7, 5, 8, 9
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def initializer_offsets(path: Path, tensors: Iterable[onnx.TensorProto]) -> dict[str, tuple[int, int]]:
    """``name -> (offset, length)`` in the file at ``path`` of the raw bytes of those of
    ``tensors`` (main-graph initializers parsed from it) that the file holds byte for byte there:
    each is compared, so a tensor named twice, or a file that is no well-formed protobuf or has
    changed since, gives none (its values are then copied, as without this)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            spans = _offsets(data)
        except (IndexError, ValueError):
            return {}
        return {t.name: spans[t.name] for t in tensors if t.name in spans and _holds(data, spans[t.name], t.raw_data)}


def _holds(data: mmap.mmap, span: tuple[int, int], raw: bytes) -> bool:
    offset, length = span
    return length == len(raw) and np.array_equal(np.frombuffer(data, np.uint8, length, offset), np.frombuffer(raw, np.uint8))


def _offsets(data: mmap.mmap) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    repeated: set[str] = set()
    for number, start, end in _fields(data, 0, len(data)):
        if number != MODEL_GRAPH:
            continue
        for field, tensor_start, tensor_end in _fields(data, start, end):
            if field != GRAPH_INITIALIZER:
                continue
            name, raw = None, None
            for item, item_start, item_end in _fields(data, tensor_start, tensor_end):
                if item == TENSOR_NAME:
                    name = bytes(data[item_start:item_end]).decode("utf-8")
                elif item == TENSOR_RAW_DATA:
                    raw = (item_start, item_end - item_start)
            if name is not None and raw is not None:
                if name in found:
                    repeated.add(name)
                found[name] = raw
    return {name: span for name, span in found.items() if name not in repeated}


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, payload start, payload end)`` of each length-delimited field of the
    message in ``data[start:end]``; other fields are skipped."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        wire = key & 7
        if wire == _VARINT:
            _, position = _varint(data, position)
        elif wire == _FIXED64:
            position += 8
        elif wire == _FIXED32:
            position += 4
        elif wire == _BYTES:
            length, position = _varint(data, position)
            if position + length > end:
                raise ValueError("a field runs past its message")
            yield key >> 3, position, position + length
            position += length
        else:
            raise ValueError(f"wire type {wire} (groups) in an ONNX file")
    if position != end:
        raise ValueError("a field runs past its message")


def _varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
