"""The sample axis of the runs that feed many samples (statistics, held-out fidelity).

Exporters often fix the batch dimension of every input, at 1 or at the example's batch
(``torch.onnx.export`` without dynamic axes). Such a model usually computes each sample on its
own all the same, so the copies that runs build (:func:`~spa_compiler.shapes.free_batch`)
declare that dimension as symbolic, and :func:`fixed_batch` probes once per graph whether a
batch of two then gives, sample for sample, what two runs of one give. Only when it does not (a
Reshape to a constant batch, samples mixed) does every run hold exactly the declared batch
(:func:`exact_batch`), the last run of a count it does not divide topped up with copies of its last
sample, which no result keeps (:func:`~spa_compiler.sample_layout.padded`). The re-fit's, the
sensitivity's and the depth units' runs keep one sample per run for a model declaring a batch of 1
(:meth:`~spa_compiler.paired.PairedRunner.batch_for`). The pruned model keeps the input model's
declared shapes; only these internal copies differ. Runs hold samples sample-major
(:mod:`.sample_layout`).
"""

from __future__ import annotations

import numpy as np
import onnx

from .ir import Graph
from .sample_layout import model_feeds, sample_shape
from .shapes import declared_batch, synthetic_inputs
from .verify import quiet_run, reference_session

__all__ = ["fixed_batch", "exact_batch", "declares_batch_of_one", "samples_per_run", "activations"]

PROBE_RTOL = 1e-3  # batched and single-sample kernels may sum in different orders
RUN_BYTES = 64 << 20  # tensors one run of many samples holds, at most (unless one sample takes more)


def fixed_batch(graph: Graph) -> bool:
    """Whether samples must run one at a time: a batch of two synthetic samples fails in the
    model's :func:`~spa_compiler.shapes.free_batch` copy, or (where the copy changed a declared first dimension)
    differs from the two samples run one at a time. Probed once per graph; a model onnxruntime
    cannot run at all counts as batched (whoever runs it next reports why)."""
    if "_fixed_batch" not in graph.__dict__:
        graph.__dict__["_fixed_batch"] = not _runs_batched(graph)
    return graph.__dict__["_fixed_batch"]


def exact_batch(graph: Graph) -> int | None:
    """The samples every run of the model's copies must hold: its declared batch where the batch
    is fixed (:func:`fixed_batch`; 1 when it declares none), 1 for a model declaring a batch of 1
    (its runs stay those of single samples, their folds and row draws too), else None (any)."""
    if fixed_batch(graph):
        return declared_batch(graph.model) or 1
    return 1 if declares_batch_of_one(graph.model) else None


def samples_per_run(graph: Graph, batch_size: int, tensors: set[str], bound: int | None = None) -> int:
    """Samples per onnxruntime run: the declared batch when the batch is fixed, otherwise
    ``batch_size``, fewer when ``tensors`` (those a run returns or holds) would take more than
    ``bound`` bytes (``RUN_BYTES`` unless given): such runs are memory-bound (ResNet-50 runs a
    third slower per image in batches of 8 than one at a time, its layers' inputs, 35 MB per
    image, returned)."""
    if fixed_batch(graph):
        return declared_batch(graph.model) or 1
    bound = RUN_BYTES if bound is None else bound
    return max(1, min(batch_size, bound // max(_tensor_bytes(graph, tensors), 1)))


def activations(graph: Graph) -> set[str]:
    """Every tensor a node of the graph computes: what a run of the whole model holds."""
    return {name for node in graph.nodes for name in node.outputs if name}


def _tensor_bytes(graph: Graph, tensors: set[str]) -> int:
    """Bytes of ``tensors`` at the graph's shapes (one sample), those of unknown shape left out."""
    return sum(
        int(np.prod(graph.shapes[name])) * onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name]).itemsize
        for name in tensors if name in graph.shapes and name in graph.dtypes
    )


def _runs_batched(graph: Graph) -> bool:
    try:
        session, weights = reference_session(graph)  # a copy with its batch freed
    except Exception:  # noqa: BLE001  (custom ops and the like: not this probe's question)
        return True
    samples = synthetic_inputs({name: (2, *sample_shape(graph, name)) for name in graph.input_shapes}, graph.dtypes)
    quiet = quiet_run()  # a failure is the answer, not an error to log
    try:
        batched = session.run(None, {**model_feeds(graph, samples), **weights}, quiet)
    except Exception:  # noqa: BLE001  (onnxruntime raises its own error types, one per status)
        return False
    if declared_batch(graph.model) is None and not declares_batch_of_one(graph.model):
        return True  # the model itself names its batch axis
    try:
        singles = [session.run(None, model_feeds(graph, {k: v[i:i + 1] for k, v in samples.items()}) | weights, quiet)
                   for i in range(2)]
    except Exception:  # noqa: BLE001  (a Reshape to a constant batch of two or more)
        return False
    return all(_agree(both, [one[k] for one in singles]) for k, both in enumerate(batched))


def declares_batch_of_one(model: onnx.ModelProto) -> bool:
    """Whether a graph input or output declares a first dimension of 1 (:func:`~spa_compiler.shapes.free_batch` frees it)."""
    return any(
        v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_value == 1
        and v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in (*model.graph.input, *model.graph.output)
    )


def _agree(batched: np.ndarray, singles: list[np.ndarray]) -> bool:
    """Whether a batched output is the single-sample outputs stacked on the first axis."""
    if np.ndim(batched) == 0 or any(np.ndim(s) == 0 or np.shape(s)[0] != 1 for s in singles):
        return False
    joined = np.concatenate(singles)
    if joined.shape != np.shape(batched):
        return False
    if not np.issubdtype(joined.dtype, np.floating):
        return bool(np.array_equal(joined, batched))
    finite = joined[np.isfinite(joined)]  # a model may compute NaN on some inputs, batched or not
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    return bool(np.allclose(batched, joined, rtol=PROBE_RTOL, atol=PROBE_RTOL * scale, equal_nan=True))
