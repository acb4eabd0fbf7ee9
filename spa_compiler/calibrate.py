"""Calibration data and the input statistics of consumer layers.

A *consumer layer* reads a group's channels through a weight as a plain linear map, as its op
rule's ``input_weight`` describes (a one-group Conv, a Gemm, a MatMul with a constant 2-D
weight; :class:`~spa_compiler.ops.WeightView`). For each, the second-order and activation-aware criteria
need ``H = Xᵀ X`` over its input *features*: for a Conv the im2col patches (channel-major, then
kernel row and column, with the layer's stride, dilation and padding), for a linear layer the
last axis. A constant 1 is appended to every row, so ``H`` also carries the feature sums and the
sample count, which lets compensation update the bias.

A layer with more than ``MAX_FEATURES`` input features (VGG's first classifier layer reads
25,088) gets no statistics: its ``H`` would take gigabytes, so the channels it reads are scored
by the criterion's fallback (magnitude) and its weights are not compensated.

A Conv with more than ``MAX_PATCH_FEATURES`` patch features (a 3x3 conv over 256 channels has
2304) uses the Kronecker approximation instead: ``H`` over input channels only, from the input's
pixels, shared by all kernel positions, each (output, kernel position) pair then being a row of
the weight matrix. The inverse of a 2305-wide ``H`` would cost 700 times that of a 257-wide one.

Statistics stream: a model exposing every consumer input runs batch by batch in onnxruntime and
``H`` accumulates in float64, so memory stays ``sum (features + 1)^2`` whatever the number of
samples. Each layer uses at most ``ROWS_PER_FEATURE * (features + 1)`` rows in all (patches or
tokens, a seeded random subset spread evenly over the batches): enough for a well-conditioned
``H``, and it bounds the time on large feature maps.

Without calibration data, statistics come from seeded synthetic inputs shaped like the modality
each graph input expects (:mod:`spa_compiler.synthetic`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from . import streaming
from .analysis import Analysis
from .quantized import float_product, with_float_weights
from .errors import InputError, first_line
from .ir import Graph, Node
from .shapes import free_batch_copy
from .batch_axis import exact_batch, samples_per_run
from .sample_layout import run_samples, sample_axis, sample_major
from .ops import WeightView, get_rule
from .feature_rows import feature_width, layer_features, row_count, row_products, sample_rows
from .token_mask import attention_mask
from .verify import session_for

__all__ = [
    "ConsumerLayer",
    "LayerStatistics",
    "MAX_FEATURES",
    "batches",
    "exposing",
    "with_weight_inputs",
    "consumer_layers",
    "layer_output",
    "cast_exactly",
    "load_calibration",
    "sameness",
    "collect_statistics",
    "add_statistics",
    "statistics_batch_size",
]

log = logging.getLogger(__name__)

ROWS_PER_FEATURE = 8
MAX_ROWS = 16384
MAX_PATCH_FEATURES = 1152
MAX_FEATURES = 8192  # H of a wider layer would take over 512 MiB (and its inverse as much)
CHUNK_ROWS = 2048  # rows buffered per layer before one Gram update (few-row updates are memory-bound)


@dataclass(frozen=True)
class ConsumerLayer:
    """A weighted node reading channels: ``matrix(W)`` is ``[outputs, features]``; ``op_type``
    names it in messages, ``channel_axis`` says where its input's channels lie."""

    node: str
    op_type: str
    activation: str
    weight: str
    axis: int  # the weight axis that reads input channels
    features_per_channel: int  # kernel positions of a Conv with patch statistics, else 1
    bias: str | None
    rows_per_output: int = 1  # kernel positions of a Conv with channel statistics, else 1
    patches: bool = False  # a 2-D Conv with im2col patch statistics (else channel statistics)
    channel_axis: int = -1  # the input's axis of channels: 1 (channels first, a Conv) or -1 (last)
    bias_columns: int = 0  # the bias is the first this many of its tensor's last axis (0: all; WeightView)

    def features(self, graph: Graph) -> int:
        """Columns of ``matrix(W)``: the width of ``H`` (without the constant 1)."""
        return graph.constants[self.weight].shape[self.axis] * self.features_per_channel

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        if self.patches:
            return weight.reshape(weight.shape[0], -1)
        return np.moveaxis(weight, self.axis, -1).reshape(-1, weight.shape[self.axis])

    def from_matrix(self, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.patches:
            return matrix.reshape(like.shape).astype(like.dtype)
        moved = np.moveaxis(like, self.axis, -1).shape
        return np.moveaxis(matrix.reshape(moved), -1, self.axis).astype(like.dtype)

    def bias_rows(self, bias: np.ndarray) -> np.ndarray:
        """The bias of each row of ``matrix(W)``, from the bias tensor: each output's bias
        (:func:`bias_part`) shared evenly by its ``rows_per_output`` rows, in float64."""
        k = self.rows_per_output
        return np.repeat(bias_part(bias, self.bias_columns).reshape(-1).astype(np.float64) / k, k)

    def bias_from_rows(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The bias tensor, shaped and typed as ``like``, whose outputs' biases are the sums of
        ``rows`` over each output's rows (the inverse of :meth:`bias_rows`); any part of ``like``
        past ``bias_columns`` is kept."""
        outputs = rows.reshape(-1, self.rows_per_output).sum(axis=1)
        if not self.bias_columns:
            return outputs.reshape(like.shape).astype(like.dtype)
        updated = like.copy()
        updated[..., : self.bias_columns] = outputs.reshape(*like.shape[:-1], self.bias_columns)
        return updated


def bias_part(bias: np.ndarray, columns: int) -> np.ndarray:
    """The part of a bias tensor that is a layer's bias: the first ``columns`` of its last axis
    (0: all of it)."""
    return bias[..., :columns] if columns else bias


@dataclass
class LayerStatistics:
    """``hessian`` is ``sum rowsᵀ rows`` over input features plus a trailing constant 1."""

    layer: ConsumerLayer
    hessian: np.ndarray
    rows: int = 0
    pending: list[np.ndarray] = field(default_factory=list, repr=False)
    pending_rows: int = field(default=0, repr=False)

    def add(self, rows: np.ndarray) -> None:
        """Queue feature rows (without the constant 1); fold them in by chunks of
        ``CHUNK_ROWS`` (:func:`~spa_compiler.feature_rows.row_products`), the caller flushing at
        each batch's end."""
        self.pending.append(rows)
        self.pending_rows += len(rows)
        if self.pending_rows >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            rows = np.vstack(self.pending)
            self.hessian += row_products(rows)[0]
            self.rows += len(rows)
            self.pending, self.pending_rows = [], 0

    def spill(self) -> None:
        """Keep ``H`` (and the inverses computed later) on disk, memory-mapped when read: each
        inverse is mapped anew for its caller, and ``H``'s pages are given back once it is inverted."""
        self.hessian = streaming.spilled(self.hessian)
        self.__dict__["_spilled"] = True

    def inverse(self, damping: float, with_bias: bool = True) -> np.ndarray:
        """``(H + damping * mean(diag H) * I)⁻¹``, over the features and (``with_bias``) the
        constant feature; computed once per argument pair (and spilled with ``H``)."""
        cache = self.__dict__.setdefault("_inverses", {})
        key = (damping, with_bias)
        if key not in cache:
            hessian = self.hessian if with_bias else self.hessian[:-1, :-1]
            diagonal = np.diag(hessian)
            scale = float(diagonal.mean()) if diagonal.size and diagonal.mean() > 0 else 1.0
            damped = np.array(hessian)
            damped[np.diag_indices(len(damped))] += damping * scale
            inverse = np.linalg.inv(damped)
            if self.__dict__.get("_spilled"):
                inverse = str(streaming.spilled(inverse).filename)
                self.hessian = streaming.remapped(self.hessian)
            cache[key] = inverse
        return streaming.remapped(cache[key]) if isinstance(cache[key], str) else cache[key]


def layer_tensors(graph: Graph, node: Node) -> tuple[str, str] | None:
    """``(input, output)``: the float tensors a weighted node reads and computes, its first input
    and its output; for an integer product of a dynamic weight, those of its float view
    (:func:`~spa_compiler.quantized.float_product`), None when it has none."""
    if len(node.inputs) > 1 and node.inputs[1] in graph.integer_weights:
        return float_product(graph, node)
    return node.inputs[0], node.outputs[0]


def layer_output(graph: Graph, node: Node) -> str:
    """The float tensor a consumer layer computes (one with float tensors: :func:`layer_tensors`)."""
    return layer_tensors(graph, node)[1]


def _bias_of(graph: Graph, node: Node, view: WeightView, output: str) -> str | None:
    """The constant bias added to this layer's float ``output``, if it is a plain per-output vector: the
    node's own (``view.bias``), or for a layer whose outputs lie along the last axis a constant
    that the node alone reading its output adds to it first (an Add's other operand, a fused
    op's bias input: what its rule's ``added_bias`` says)."""
    if view.bias is not None:
        plain = graph.is_constant(view.bias) and bias_part(graph.constants[view.bias], view.bias_columns).size == view.outputs
        return view.bias if plain else None
    if view.channel_axis != -1:
        return None  # a [outputs] vector added to channels-first outputs would broadcast along the last axis
    consumers = graph.consumers.get(output, [])
    if len(consumers) != 1:
        return None
    rule = get_rule(consumers[0].domain, consumers[0].op_type, graph.opset)
    bias = rule.added_bias(consumers[0], output) if rule else None
    if bias and graph.is_constant(bias) and graph.constants[bias].shape == (view.outputs,):
        return bias
    return None


def consumer_layers(analysis: Analysis) -> list[ConsumerLayer]:
    """Every node reading a group's channels through a constant weight as a plain linear map
    (what its op rule's ``input_weight`` says: a one-group Conv, a Gemm, a MatMul with a 2-D
    weight, ...; an integer product of a dynamic weight reads the float tensor it quantizes:
    :func:`~spa_compiler.quantized.float_product`), outside control-flow subgraphs (whose
    tensors onnxruntime cannot return). A
    2-D convolution with at most ``MAX_PATCH_FEATURES`` patch features gets patch statistics,
    any other one channel statistics (one row per kernel position)."""
    graph = analysis.graph
    layers = {}
    for axis_id in analysis.tags.get("consumer", []):
        ref = analysis.axes[axis_id]
        weight = graph.constants[ref.tensor]
        for node in graph.consumers.get(ref.tensor, []):
            rule = get_rule(node.domain, node.op_type, graph.opset)
            view = rule.input_weight(node, ref.tensor, ref.axis, weight.shape) if rule and not node.scope else None
            floats = layer_tensors(graph, node)
            if view is None or floats is None:
                continue
            positions = int(np.prod(view.kernel))
            patches = view.patches and len(view.kernel) == 2 and positions * weight.shape[ref.axis] <= MAX_PATCH_FEATURES
            layers[node.name] = ConsumerLayer(
                node.name, node.op_type, floats[0], ref.tensor, ref.axis,
                positions if patches else 1, _bias_of(graph, node, view, floats[1]),
                1 if patches else positions, patches, view.channel_axis, view.bias_columns,
            )
    return list(layers.values())


def _check_array(name: str, array: np.ndarray, graph: Graph, count: int) -> np.ndarray:
    """``array``, ``count`` samples of input ``name`` as the model takes them, checked against its
    shape and cast to its type, sample-major (:func:`~spa_compiler.sample_layout.sample_major`)."""
    expected, axis = graph.input_shapes[name], sample_axis(graph, name)
    if axis is None:
        if array.ndim > 1:
            raise InputError(f"calibration array '{name}' has shape {array.shape}; the input is a scalar: give one value")
    elif array.ndim != len(expected) or any(array.shape[k] != size for k, size in enumerate(expected) if k != axis):
        layout = ", ".join("samples" if k == axis else str(size) for k, size in enumerate(expected))
        raise InputError(f"calibration array '{name}' has shape {array.shape}; expected ({layout}) to match the model input")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name])
    try:
        return sample_major(graph, name, cast_exactly(array, dtype, f"calibration array '{name}'"), count)
    except ValueError as exc:
        raise InputError(f"calibration array '{name}': {exc}") from None


def cast_exactly(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``array`` (``what``, as errors name it) cast to an input's type, refused when the cast
    would change what it says: to an integer or boolean type only values that type holds
    exactly (token ids 101.0, not 0.5 or 2**40 for int32), to a floating type no finite value
    that overflows."""
    with np.errstate(invalid="ignore", over="ignore"):
        cast = array.astype(dtype, copy=False)
        if cast.dtype == array.dtype:
            return cast
        integral = np.issubdtype(dtype, np.integer) or dtype == np.bool_
        changed = np.flatnonzero(cast.astype(array.dtype) != array) if integral else []
    if not integral:
        changed = np.flatnonzero(np.isfinite(array) & ~np.isfinite(cast)) if array.dtype.kind in "fc" else []
    if len(changed):
        raise InputError(f"{what} holds {array.flat[changed[0]].item()!r}, which the input's type "
                         f"{np.dtype(dtype).name} cannot hold; give the values the model takes, as {np.dtype(dtype).name}")
    return cast


def load_calibration(path: str | os.PathLike, graph: Graph, samples: int) -> dict[str, np.ndarray]:
    """The first ``samples`` of every input's array (:func:`read_arrays`), checked against the
    model's input shapes and cast to its input types, sample-major."""
    axes = {name: sample_axis(graph, name) for name in graph.inputs}
    arrays = read_arrays(path, graph.inputs, axes=axes)
    count = next(iter(_sample_counts(arrays, axes)), 1)
    return {name: _check_array(name, arrays[name], graph, count)[:samples] for name in graph.inputs}


SAMPLE_FILES = ("give an .npz of one array per input name (numpy.savez), one .npy for a model of one input, "
                "or a folder of NAME.npy files")


def _file_arrays(path: Path, inputs: list[str], option: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name, or of an ``.npy`` file as the only input's."""
    data = np.load(path)
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise InputError(f"{option} {path} is one array and the model has {len(inputs)} inputs "
                             f"({', '.join(inputs)}); {SAMPLE_FILES}")
        return {inputs[0]: data}
    with data:
        return {name: data[name] for name in data.files}


def read_arrays(path: str | os.PathLike, inputs: list[str], option: str = "--calib",
                axes: dict[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """Arrays keyed by input name, samples along each input's axis in ``axes`` (the first when
    not given; None: a scalar input, one value for all), from an ``.npz`` file or a directory
    holding ``NAME.npy`` per input (or, for a one-input model, any ``*.npy`` files, concatenated
    in name order), or for a one-input model an ``.npy`` file, every one with the same non-zero
    number of samples and finite. Errors name the file as given to ``option``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{option} {path}: no such file or directory")
    try:
        if path.is_dir():
            files = {p.stem: p for p in sorted(path.glob("*.npy"))}
            if set(inputs) <= set(files):
                arrays = {name: np.load(files[name]) for name in inputs}
            elif len(inputs) == 1 and files:
                arrays = {inputs[0]: np.concatenate([np.load(p) for p in files.values()])}
            else:
                raise InputError(f"{option} {path}: expected {', '.join(n + '.npy' for n in inputs)}")
        else:
            arrays = _file_arrays(path, inputs, option)
    except (OSError, ValueError) as exc:
        reason = "it holds Python objects, not arrays" if "pickle" in str(exc) else first_line(exc)
        raise InputError(f"{option} {path} cannot be read as numpy data ({reason}); {SAMPLE_FILES}") from None
    missing = [name for name in inputs if name not in arrays]
    if missing:
        raise InputError(f"{option} {path} has no array for input(s) {', '.join(missing)}; keys: {', '.join(arrays)}")
    counts = _sample_counts({name: arrays[name] for name in inputs}, axes or {})
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{option} {path}: every input needs the same, non-zero number of samples")
    unfinite = [name for name in inputs
                if np.issubdtype(arrays[name].dtype, np.floating) and not np.isfinite(arrays[name]).all()]
    if unfinite:
        raise InputError(f"{option} {path}: {', '.join(unfinite)} holds NaN or infinite values; give finite samples")
    return {name: arrays[name] for name in inputs}


def _sample_counts(arrays: dict[str, np.ndarray], axes: dict[str, int | None]) -> set[int]:
    """The numbers of samples ``arrays`` hold along their inputs' sample axes (scalar inputs aside;
    0 for an array lacking the axis)."""
    counts = set()
    for name, array in arrays.items():
        axis = axes.get(name, 0)
        if axis is not None:
            counts.add(array.shape[axis] if np.ndim(array) > axis else 0)
    return counts


def array_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shapes of the arrays in a ``--calib`` file (``.npz`` members) or folder (``.npy``
    files, by name), read from their headers without their data; empty when they cannot be read
    (:func:`read_arrays` then says why)."""
    path = Path(path)
    try:
        if path.is_dir():
            return {p.stem: tuple(np.load(p, mmap_mode="r").shape) for p in sorted(path.glob("*.npy"))}
        with zipfile.ZipFile(path) as archive:
            return {member[:-len(".npy")]: _header_shape(archive, member) for member in archive.namelist()
                    if member.endswith(".npy")}
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}


def _header_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    """The shape an ``.npy`` member of an ``.npz`` archive declares in its header."""
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read(stream)[0])


def sameness(arrays: dict[str, np.ndarray]) -> str | None:
    """Why ``arrays`` (samples of a model's inputs, first axis samples) cannot describe its
    inputs, or None: every sample equal to the first (two or more samples), or every
    floating-point input holding one value throughout (a blank image; a constant input beside
    one that varies, such as a recurrent model's zero initial state, is as it should be).
    Statistics from such data are those of one input, and the channels chosen and weights
    re-fitted fit that input."""
    count = len(next(iter(arrays.values())))
    if count > 1 and all(np.array_equal(a, np.broadcast_to(a[:1], a.shape)) for a in arrays.values()):
        return f"its {count} samples are all the same"
    floating = {name: a for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and a.size}
    if floating and all(np.all(a == a.flat[0]) for a in floating.values()):
        name, a = next(iter(floating.items()))
        return f"input '{name}' holds the one value {a.flat[0]:g} throughout"
    return None


def batches(arrays: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    total = len(next(iter(arrays.values())))
    for start in range(0, total, size):
        yield {name: a[start:start + size] for name, a in arrays.items()}


def exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names``, its batch left free
    (:func:`~spa_compiler.shapes.free_batch`)."""
    probe = free_batch_copy(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return probe


def collect_statistics(
    graph: Graph,
    layers: list[ConsumerLayer],
    data: dict[str, np.ndarray],
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    first_batch: int = 0,
    total_batches: int | None = None,
) -> dict[str, LayerStatistics]:
    """Run ``data`` through the model and accumulate every layer's ``H``.

    Rows are drawn per *batch* of ``batch_size`` samples: batch ``b`` samples its rows with its
    own generator, seeded by ``(seed, b)``, so the rows taken from a batch do not depend on which
    batches ran before it, nor on how many samples each onnxruntime run takes
    (:func:`statistics_batch_size`: fewer than a batch where the model's batch is fixed or the
    layers' inputs are large; a batch's rows are drawn at its first run and each run keeps those
    of its samples). The statistics of a streamed model that would outgrow a quarter of its
    weights are collected in chunks of layers, one pass over the data per chunk, each chunk's
    spilled to disk before the next (:func:`~spa_compiler.streaming.statistics_chunks`; a layer's
    rows are then drawn after those of its chunk's earlier layers, not of all layers). A *shard*
    of a larger collection passes its slice of the samples (whole batches), the index of its
    first batch and the collection's ``total_batches`` (which sets the rows taken per batch); the
    statistics of shards covering every batch add up (:func:`add_statistics`) to those of one
    run over all."""
    activations = sorted({layer.activation for layer in layers})
    run_size, exact = statistics_batch_size(graph, batch_size, layers), exact_batch(graph)
    session = session_for(exposing(graph.model, activations))  # optimised (NCHWc): ResNet-50 runs a quarter quicker
    widths = {layer.node: feature_width(layer, graph.shapes[layer.activation]) + 1 for layer in layers}
    chunks = streaming.statistics_chunks(graph, layers, [8 * widths[layer.node] ** 2 for layer in layers])
    total = len(next(iter(data.values())))
    batch_count = total_batches or -(-total // batch_size)
    stats = {}
    for number, chunk in enumerate(chunks):
        names = sorted({layer.activation for layer in chunk})
        for layer in chunk:
            stats[layer.node] = LayerStatistics(layer, np.zeros((widths[layer.node], widths[layer.node])))
        budgets = {layer.node: -(-min(ROWS_PER_FEATURE * widths[layer.node], MAX_ROWS) // batch_count) for layer in chunk}
        done = 0
        for index, batch in enumerate(batches(data, batch_size), start=first_batch):
            rng = np.random.default_rng([seed, index])
            count = len(next(iter(batch.values())))
            mask = attention_mask(batch)
            drawn: dict[str, _BatchRows] = {}
            for offset in range(0, count, run_size):
                feeds = {name: array[offset:offset + run_size] for name, array in batch.items()}
                samples = len(next(iter(feeds.values())))
                values = dict(zip(names, run_samples(session, names, graph, feeds, exact)))
                for layer in chunk:  # in layer order, as one run over the batch draws them
                    x = values[layer.activation]
                    if layer.node not in drawn or not drawn[layer.node].shared:
                        drawn[layer.node] = _BatchRows.draw(
                            layer, graph, x, offset, samples, count, rng, budgets[layer.node], mask)
                    rows = drawn[layer.node].of_run(offset, samples)
                    if rows is None or len(rows):  # none drawn from this run's samples: nothing to add
                        stats[layer.node].add(layer_features(layer, graph, x, rows))
                done += samples
                if progress:
                    progress(number * total + done, len(chunks) * total)
            for layer in chunk:  # a batch's rows never share a product with another's: shards sum the same products
                stats[layer.node].flush()
        if len(chunks) > 1:
            for layer in chunk:
                stats[layer.node].spill()
    return stats


@dataclass(frozen=True)
class _BatchRows:
    """The rows drawn for one layer from a batch of ``count`` samples (flat indices over the
    batch's rows, sample-major; None for all), or, when ``shared`` is false, from one run only."""

    rows: np.ndarray | None
    count: int
    per_sample: int
    shared: bool = True

    @classmethod
    def draw(cls, layer: ConsumerLayer, graph: Graph, x: np.ndarray, offset: int, samples: int, count: int,
             rng: np.random.Generator, budget: int, mask: np.ndarray | None) -> _BatchRows:
        """Draw at the run of ``samples`` samples from ``offset`` whose layer input is ``x``: from
        the whole batch when the run holds it or ``x`` leads with the samples; otherwise (an input
        whose first axis is not the samples', run in parts) the run's share of the budget."""
        if samples == count:
            return cls(sample_rows(layer, graph, x.shape, rng, budget, mask), count, 0)
        if len(x) == samples:
            shape = (count, *x.shape[1:])
            return cls(sample_rows(layer, graph, shape, rng, budget, mask), count, row_count(layer, graph, shape) // count)
        part = None if mask is None else mask[offset:offset + samples]
        return cls(sample_rows(layer, graph, x.shape, rng, -(-budget * samples // count), part), samples, 0, shared=False)

    def of_run(self, offset: int, samples: int) -> np.ndarray | None:
        """The rows of the run of ``samples`` samples from ``offset``, indexed within the run."""
        if self.rows is None or not self.shared or samples == self.count:
            return self.rows
        low, high = offset * self.per_sample, (offset + samples) * self.per_sample
        return self.rows[(self.rows >= low) & (self.rows < high)] - low


def statistics_batch_size(graph: Graph, batch_size: int, layers: list[ConsumerLayer]) -> int:
    """Samples per onnxruntime run while collecting the statistics of ``layers``
    (:func:`~spa_compiler.batch_axis.samples_per_run` of their inputs)."""
    return samples_per_run(graph, batch_size, {layer.activation for layer in layers})


def add_statistics(parts: list[dict[str, LayerStatistics]]) -> dict[str, LayerStatistics]:
    """The statistics of all the samples of ``parts`` (shards of one collection): ``H`` and
    the row counts add up, since ``H = Σ rowsᵀ rows`` is a sum over rows."""
    first, *rest = parts
    return {
        node: LayerStatistics(
            stats.layer, stats.hessian + sum(p[node].hessian for p in rest), stats.rows + sum(p[node].rows for p in rest)
        )
        for node, stats in first.items()
    }


def with_weight_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are also graph inputs: onnxruntime then
    takes new values for them with every run, so changed weights need no new session. A QDQ
    weight among ``names`` becomes a float initializer for that. Its batch is left free
    (:func:`~spa_compiler.shapes.free_batch`). Its IR version is at least 4: before it,
    initializers listed as graph inputs are constants and onnxruntime takes no feed for them."""
    probe = free_batch_copy(model)
    probe.ir_version = max(probe.ir_version, 4)
    with_float_weights(probe, names)
    declared = {i.name for i in probe.graph.input}
    for tensor in probe.graph.initializer:
        if tensor.name in names and tensor.name not in declared:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return probe
