"""Copies of protobuf messages that leave out chosen fields, so that their bytes (a model's
weights) are never copied."""

from __future__ import annotations

from collections.abc import Collection

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = ["copy_without_initializers", "copy_fields", "copy_field", "keep_initializers"]


def copy_without_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph lacks the initializers ``names``, made field by
    field so that their bytes are never copied."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip="graph")
    copy_fields(model.graph, copy.graph, skip="initializer")
    copy.graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    return copy


def keep_initializers(graph: onnx.GraphProto, names: Collection[str]) -> None:
    """Remove from ``graph`` every initializer not named in ``names``, in place: the others stay
    where they are, their bytes not copied (clearing the list and adding back the kept ones
    copies them all: 3 s for a 500 MB model)."""
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in names:
            del graph.initializer[index]


def copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of ``source`` but ``skip`` into ``target`` (of the same type)."""
    for descriptor, value in source.ListFields():
        if descriptor.name != skip:
            copy_field(target, descriptor, value)


def copy_field(target: Message, descriptor: FieldDescriptor, value) -> None:
    """Set field ``descriptor`` of ``target`` to ``value`` (a scalar, a message or a repeated field)."""
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, descriptor.name).extend(value)
    elif isinstance(value, Message):
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)
