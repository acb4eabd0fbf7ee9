"""Sample-major arrays: how runs hold the samples of a model's inputs.

The samples of an input need not lie along its first axis (:func:`~spa_compiler.shapes.sample_axes`):
an RNN's initial state is ``[directions, batch, hidden]``, a sample rate is one scalar for all.
Arrays of samples are held *sample-major* throughout (samples first, then the input's other
axes in order; a scalar input's one value repeated per sample): :func:`sample_shape` is one
sample's shape, :func:`sample_major` turns an array as the model takes it into that form, and
:func:`model_feeds` turns a run's samples back into what the model takes. For an input whose
samples lie along its first axis all three change nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .shapes import sample_axes

if TYPE_CHECKING:
    from .ir import Graph

__all__ = ["sample_axis", "sample_shape", "sample_major", "model_feeds", "padded", "unpadded", "run_samples"]


def sample_axis(graph: Graph, name: str) -> int | None:
    """The axis of graph input ``name`` that holds its samples (None: a scalar), from the model's
    declared inputs; found once per graph."""
    if "_sample_axes" not in graph.__dict__:
        graph.__dict__["_sample_axes"] = sample_axes(graph.model)
    return graph.__dict__["_sample_axes"][name]


def sample_shape(graph: Graph, name: str) -> tuple[int, ...]:
    """The shape of one sample of input ``name``: its bound shape without the sample axis."""
    shape, axis = graph.input_shapes[name], sample_axis(graph, name)
    return tuple(size for k, size in enumerate(shape) if k != axis)


def sample_major(graph: Graph, name: str, array: np.ndarray, count: int) -> np.ndarray:
    """``array``, samples of input ``name`` as the model takes them, with the samples first; a
    scalar input's one value (or ``count`` equal values) repeated ``count`` times. Raises
    ValueError for a scalar input given different values."""
    axis = sample_axis(graph, name)
    if axis is not None:
        return np.moveaxis(array, axis, 0)
    values = np.asarray(array).reshape(-1)
    if values.size not in (1, count) or np.any(values != values[0]):
        raise ValueError(f"input '{name}' is a scalar, one value for all samples; give one value")
    return np.full(count, values[0], dtype=values.dtype)


def model_feeds(graph: Graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sample-major ``arrays`` (one run's samples) as the model takes them: each input's samples
    moved to its sample axis, a scalar input's first value."""
    feeds = {}
    for name, array in arrays.items():
        axis = sample_axis(graph, name) if name in graph.input_shapes else 0
        feeds[name] = np.asarray(array[0]) if axis is None else np.moveaxis(array, 0, axis) if axis else array
    return feeds


def padded(arrays: dict[str, np.ndarray], size: int | None) -> dict[str, np.ndarray]:
    """Sample-major ``arrays`` (one run's samples) topped up to ``size`` samples with copies of
    their last one, for a model whose runs must hold exactly ``size``
    (:func:`~spa_compiler.batch_axis.exact_batch`); as they are when ``size`` is None or reached."""
    count = len(next(iter(arrays.values())))
    if size is None or count >= size:
        return arrays
    return {name: np.concatenate([array, np.repeat(array[-1:], size - count, axis=0)])
            for name, array in arrays.items()}


def unpadded(values: list[np.ndarray], count: int, size: int | None) -> list[np.ndarray]:
    """The results of a run :func:`padded` from ``count`` samples to ``size``: each value whose
    first axis holds the run's ``size`` samples cut to the ``count`` real ones."""
    if size is None or count >= size:
        return values
    return [value[:count] if np.ndim(value) and len(value) == size else value for value in values]


def run_samples(session: Any, names: list[str] | None, graph: Graph, arrays: dict[str, np.ndarray],
                size: int | None, extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The values ``names`` (None: the outputs) of an onnxruntime ``session`` of the model's on
    ``arrays``, one run's sample-major samples, with the ``extra`` feeds (weights): the samples
    :func:`padded` to ``size`` and the values cut back to them (:func:`unpadded`). A value that
    is a fed input is copied: onnxruntime 1.23 returns such a value in the fed array's memory,
    which a padded copy does not outlive."""
    count = len(next(iter(arrays.values())))
    feeds = {**model_feeds(graph, padded(arrays, size)), **(extra or {})}
    requested = names if names is not None else [output.name for output in session.get_outputs()]
    values = [np.array(value) if name in feeds else value for name, value in zip(requested, session.run(names, feeds))]
    return unpadded(values, count, size)
