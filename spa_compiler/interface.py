"""The graph's interface after pruning: inputs and outputs whose sizes the user let change.

By default every axis of every graph input and output is a barrier, so the pruned model takes and
returns tensors of the original shapes. ``--allow-io-change PATTERN`` (``fnmatch`` on the names,
e.g. ``past_key_values.*`` and ``present.*`` of a decoder with a key/value cache) lifts that for
the matching names: their channel axes prune with the groups they are coupled to (the key/value
heads of a cache). Such a model is fed the original inputs without the removed indices, and its
outputs are the original outputs without them: :func:`narrow` maps one to the other, which is
also how its fidelity is measured (on the indices both models have).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .analysis import Analysis
from .shapes import dims_text

__all__ = ["InterfaceChange", "interface_changes", "narrow", "narrow_all", "resize_declarations"]


@dataclass(frozen=True)
class InterfaceChange:
    """A graph input or output whose shape pruning changed (at the bound input shapes)."""

    name: str
    kind: str  # "input" or "output"
    before: tuple[int, ...]
    after: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' {dims_text(self.before)} -> {dims_text(self.after)}"


def _removed(analysis: Analysis, removed_by_axis: dict[int, np.ndarray], name: str, rank: int) -> dict[int, np.ndarray]:
    found = {}
    for axis in range(rank):
        gone = removed_by_axis.get(analysis.axis_id(name, axis))
        if gone is not None and gone.size:
            found[axis] = gone
    return found


def interface_changes(analysis: Analysis, removed_by_axis: dict[int, np.ndarray]) -> list[InterfaceChange]:
    """The graph inputs and outputs that lose indices, in interface order."""
    graph, changes = analysis.graph, []
    for kind, names in (("input", graph.inputs), ("output", graph.outputs)):
        for name in names:
            shape = graph.shapes.get(name)
            gone = _removed(analysis, removed_by_axis, name, len(shape)) if shape else {}
            if gone:
                after = tuple(n - len(gone[k]) if k in gone else n for k, n in enumerate(shape))
                changes.append(InterfaceChange(name, kind, tuple(shape), after))
    return changes


def narrow(analysis: Analysis, removed_by_axis: dict[int, np.ndarray], name: str, value: np.ndarray) -> np.ndarray:
    """``value`` (graph input or output ``name`` at its original shape) without the removed indices."""
    for axis, gone in _removed(analysis, removed_by_axis, name, np.ndim(value)).items():
        value = np.delete(value, gone, axis=axis)
    return value


def narrow_all(analysis: Analysis, removed_by_axis: dict[int, np.ndarray], values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`narrow` of every named value."""
    return {name: narrow(analysis, removed_by_axis, name, value) for name, value in values.items()}


def resize_declarations(model: onnx.ModelProto, changes: list[InterfaceChange]) -> None:
    """Declare the new sizes of the changed graph inputs and outputs: a fixed dimension takes its
    new size, a named (dynamic) one stays named."""
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for change in changes:
        for dim, old, new in zip(values[change.name].type.tensor_type.shape.dim, change.before, change.after):
            if old != new and dim.HasField("dim_value"):
                dim.dim_value = new
