"""Verification of a pruned model before anything is written.

1. ``onnx.checker.check_model`` plus strict, type-checking shape inference: together what
   ``check_model(full_check=True)`` runs, with the inference done once, at the bound input shapes;
2. graph inputs and outputs keep their names, element types and ranks;
3. that inference gives every tensor exactly the shape the plan predicts (the original shape
   minus the removed indices), which catches a rewrite that left an attribute or shape
   constant stale;
4. onnxruntime runs it, and its outputs have the original output shapes. It runs with every
   graph optimisation (fusions that depend on the new widths) but the CPU layout one (NCHWc),
   which only reorders convolution weights in memory and would take twice their memory.

The numbers of (4) compared with the original's are the *fidelity* in the report.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from . import streaming
from .errors import ModelError, VerificationError
from .errors import first_line
from .ir import STANDARD_DOMAINS, Graph, Node
from .sample_layout import model_feeds, padded, unpadded
from .shapes import free_batch, free_batch_copy, large_float, shape_skeleton, synthetic_inputs, weights_as_inputs
from .synthetic_tokens import BYTES, embedding_table, non_image_input
from .token_mask import attention_mask, padding_zeroed

log = logging.getLogger(__name__)

__all__ = [
    "Fidelity", "verify_model", "run_model", "run_reference", "require_runnable", "quiet_run", "session_for",
    "custom_ops", "fidelity", "held_out_fidelity",
    "FidelitySums", "decision_outputs", "verification_inputs", "ARG_MAX", "THRESHOLD",
]


@dataclass(frozen=True)
class Fidelity:
    """How close the pruned outputs are to the original's on ``samples`` inputs (``source``).

    ``cosine`` is the mean over samples of the cosine between the sample's original and pruned
    outputs (all outputs flattened together), over the ``counted`` samples with a signal: a sample
    whose outputs are all but zero in both models (norms under ``SILENT`` times ``scale``, the
    largest norm of one sample's outputs in either model; a detector's map of a picture without
    text) has only round-off to compare, and its cosine is noise; ``relative_error`` is
    ``‖after − before‖ / ‖before‖`` over everything; ``top1_agreement`` is the share of decisions
    kept, for outputs that hold decisions (:func:`decision_outputs`): the positions where the
    arg-max of class scores over the last axis is unchanged, and the probabilities (of a
    Sigmoid) still on their side of 0.5 (None when no output holds any). ``counted`` 0 says the samples' outputs are all but zero beside those of other
    inputs (the held-out samples'): no figure of them means anything.
    """

    max_abs_error: float
    relative_error: float
    cosine: float
    top1_agreement: float | None = None
    samples: int = 1
    source: str = "synthetic inputs"
    optimiser_change: float | None = None  # see verify_model: the figures are then the unoptimised run's
    counted: int | None = None  # samples the cosine is over (None: every one)
    scale: float = 0.0  # largest norm of one sample's outputs, original or pruned


POOR_COSINE = 0.9  # fidelity the report warns of (report.fidelity_warning)
STANDARD_NORMAL = "standard-normal inputs"
SILENT = 1e-3  # a sample's outputs below this share of the largest sample's are all but zero
OPTIMISER_CHANGE = 1e-3  # relative change between onnxruntime's optimised and unoptimised runs beyond rounding


_LEVELS = (
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
)
"""onnxruntime's graph optimisation levels, most first."""


def session_for(
    model: onnx.ModelProto, threads: int = 0, optimize: bool = True, profile_prefix: str | None = None,
    serialized: bytes | None = None, layout: bool = True, fallback: bool = True,
) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` skips graph optimisations (quicker to create);
    ``profile_prefix`` turns on onnxruntime's profiler, writing ``<prefix>_<time>.json``;
    ``serialized``, the model's bytes when the caller has them already; ``layout=False`` leaves
    out the layout optimisation (NCHWc: weights reordered, in a second copy). A model with streamed
    weights is read from files (:func:`~spa_compiler.streaming.header_file`), never serialised
    with them. Where onnxruntime cannot build the session at the level asked, the next lower
    level is tried, unless ``fallback`` is False (the verification: users run the model
    optimised). onnxruntime 1.32 cannot build one with the layout optimisation when a Conv whose
    weight is a graph input has its output exposed too, as the sensitivity measurements of a
    ResNet's shortcut do, nor with its extended optimisations when a Transpose feeds a Resize
    that sizes its ``axes`` (opset 18)."""
    if not optimize:
        first = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        first = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if layout else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    levels = _LEVELS[_LEVELS.index(first):] if fallback else (first,)
    with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its own retries
        for level in levels[:-1]:
            try:
                return _session(model, _options(level, threads, profile_prefix), serialized)
            except Exception as error:  # onnxruntime's Fail, InvalidGraph, ... derive from Exception alone
                log.debug("no session at %s (%s): trying the next level", level, first_line(error))
        return _session(model, _options(levels[-1], threads, profile_prefix), serialized)


def _options(level: ort.GraphOptimizationLevel, threads: int, profile_prefix: str | None) -> ort.SessionOptions:
    """Options for a session of ``threads`` intra-op threads (0: onnxruntime's choice, every core).
    Those work sessions' threads do not spin-wait for work after a run: the pipeline alternates
    sessions, and runs numpy beside them, which spinning threads would slow (on 2 cores two
    sessions run alternately take 1.8 times as long). Timing sessions (``threads`` given) keep
    onnxruntime's defaults, as a deployment runs them."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if not threads:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def _session(model: onnx.ModelProto, options: ort.SessionOptions, serialized: bytes | None) -> ort.InferenceSession:
    if not streaming.has_external(model):
        return ort.InferenceSession(serialized or model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    try:
        with streaming.header_file(model) as header:
            return ort.InferenceSession(str(header), options, providers=["CPUExecutionProvider"])
    except PermissionError:  # the data file's folder is read-only
        names, weights = streaming.session_weights(model)
        values = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights]
        options.add_external_initializers(names, values)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.streamed_weights = values  # onnxruntime may read them for the session's lifetime
        return session


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """All graph outputs of ``model`` on ``feeds`` with onnxruntime."""
    return session_for(model, optimize=optimize).run(None, feeds)


def reference_session(graph: Graph) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """A session running the input model without graph optimisations, and the feeds it needs
    besides the model's inputs. Its large float weights become graph inputs fed from
    ``graph.constants``, which onnxruntime reads in place: the model is neither serialised with
    them nor copied into the session (a streamed model's are read from their files). A declared
    batch of 1 is left free (:func:`~spa_compiler.shapes.free_batch`), for batches of samples
    where :func:`~spa_compiler.batch_axis.fixed_batch` allows them."""
    model = graph.model
    if streaming.has_external(model):
        return session_for(free_batch_copy(model), optimize=False), {}
    weights = {t.name: graph.constants[t.name] for t in model.graph.initializer if large_float(t)}
    return session_for(free_batch(weights_as_inputs(model, set(weights))), optimize=False), weights


def run_reference(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All graph outputs of the input model on ``feeds`` (see :func:`reference_session`)."""
    session, weights = reference_session(graph)
    return session.run(None, {**feeds, **weights})


def require_runnable(graph: Graph, seed: int = 0) -> None:
    """Raise :class:`ModelError` when onnxruntime cannot run the input model itself on the
    verification's inputs (:func:`verification_inputs`), as when a shape its exporter wrote does
    not fit."""
    try:
        session, weights = reference_session(graph)
        session.run(None, {**verification_inputs(graph, seed)[0], **weights}, quiet_run())
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, ... derive from Exception alone
        raise _input_model_fails(exc) from None


def quiet_run() -> ort.RunOptions:
    """Options for a run whose failure is reported by its caller, not logged by onnxruntime."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _input_model_fails(exc: Exception) -> ModelError:
    """spa-prune runs the model to score, compensate and verify the pruning: a failure to run the
    input model is the model's, not the pruning's."""
    return ModelError(f"onnxruntime cannot run the input model ({first_line(exc)}); spa-prune runs the model to "
                      "measure and verify the pruning: check that it runs in onnxruntime as it is, or export it again")


def _checker_error(model: onnx.ModelProto) -> str | None:
    try:
        streaming.check_model(model)
    except Exception as exc:
        return first_line(exc)
    return None


def _check_interface(original: Graph, pruned: onnx.ModelProto) -> None:
    def signature(values, skip):
        return [
            (v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in values if v.name not in skip
        ]

    constants = set(original.constants)
    initializers = {t.name for t in pruned.graph.initializer}
    if signature(original.model.graph.input, constants) != signature(pruned.graph.input, initializers):
        raise VerificationError("internal error: the pruned model's graph inputs differ; nothing was written")
    if signature(original.model.graph.output, ()) != signature(pruned.graph.output, ()):
        raise VerificationError("internal error: the pruned model's graph outputs differ; nothing was written")


def _check_shapes(original: Graph, pruned: onnx.ModelProto, expected: dict[str, tuple[int, ...]]) -> None:
    bound = shape_skeleton(pruned, {name: expected.get(name, shape) for name, shape in original.input_shapes.items()})
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise VerificationError(
            f"internal error: the pruned model fails shape inference ({first_line(exc)}); nothing was written"
        ) from None
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims) or value.name not in expected:
            continue
        shape = tuple(d.dim_value for d in dims)
        if shape != expected[value.name]:
            producer = original.producer.get(value.name)
            raise VerificationError(
                f"internal error: tensor '{value.name}' (from {producer}) has shape {shape} after "
                f"pruning, expected {expected[value.name]}; nothing was written"
            )


Narrowing = Callable[[str, np.ndarray], np.ndarray]


def _unchanged(name: str, value: np.ndarray) -> np.ndarray:
    return value


def verify_model(
    original: Graph, pruned: onnx.ModelProto, expected: dict[str, tuple[int, ...]], seed: int = 0,
    narrow: Narrowing = _unchanged, reference: Graph | None = None,
) -> Fidelity | None:
    """Run every check; raise :class:`VerificationError` on the first failure. Returns None
    (checks 1-3 only) when the model has custom ops onnxruntime cannot run. ``narrow`` maps an
    original graph input or output (by name) to the pruned model's (see
    :mod:`spa_compiler.interface`; the identity unless the user let the interface change).
    ``reference`` is the model the outputs are compared with, ``original`` unless passes
    rewrote the graph before pruning (rotated heads, removed branches): then the input model.
    The fidelity is that of the pruned model run optimised, as users run it; when it is poor
    (cosine under ``POOR_COSINE``), that of its unoptimised run if onnxruntime's optimisations
    change its outputs (:func:`_unoptimised_if_changed`)."""
    reference = original if reference is None else reference
    feeds, source = verification_inputs(reference, seed)
    try:  # first: a model that does not run is not the pruning's fault
        before = run_reference(reference, feeds)
    except Exception as exc:
        if not custom_ops(reference):
            raise _input_model_fails(exc) from None
        before = None
    serialized = None if streaming.has_external(pruned) else pruned.SerializeToString()
    try:
        streaming.check_model(pruned) if serialized is None else onnx.checker.check_model(serialized)
    except Exception as exc:
        if _checker_error(original.model) != first_line(exc):
            raise VerificationError(
                f"internal error: the pruned model fails the ONNX checker ({first_line(exc)}); nothing was written"
            ) from None
        log.warning("the input model already fails the ONNX checker the same way: %s", first_line(exc))
    _check_interface(original, pruned)
    emptied = [n for n, shape in expected.items() if 0 in shape and 0 not in original.shapes.get(n, ())]
    if emptied:
        raise VerificationError(f"internal error: tensor '{emptied[0]}' would lose every element; nothing was written")
    _check_shapes(original, pruned, expected)
    if before is None:
        return None
    before = [narrow(name, value) for name, value in zip(original.outputs, before)]
    pruned_feeds = {k: narrow(k, v) for k, v in feeds.items()}
    try:
        session = session_for(pruned, serialized=serialized, layout=False, fallback=False)  # as users will run it
        after = session.run(None, pruned_feeds)
    except Exception as exc:
        level = _running_level(original.model, feeds)
        if level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED:
            raise VerificationError(_run_failure(pruned, serialized, pruned_feeds, first_line(exc))) from None
        log.warning("onnxruntime's extended graph optimisations cannot run the input model either (%s): the pruned "
                    "model is checked with the optimisations that run it", first_line(exc))
        try:
            after = _session(pruned, _options(level, 0, None), serialized).run(None, pruned_feeds)
        except Exception as again:
            raise VerificationError(f"internal error: onnxruntime cannot run the pruned model ({first_line(again)}); "
                                    "nothing was written") from None
    for name, a, b in zip(original.outputs, before, after):
        if np.shape(a) != np.shape(b):
            raise VerificationError(
                f"internal error: output '{name}' has shape {np.shape(b)}, expected {np.shape(a)}; nothing was written"
            )
        if _numeric(a) and np.any(np.isfinite(a) & ~np.isfinite(b)):
            raise VerificationError(
                f"the pruned model's output '{name}' is not finite (inf or NaN) where the original's is, on synthetic "
                "inputs: its activations overflow; nothing was written. Try a milder target or --refit 0"
            )
    decisions = decision_outputs(reference)
    measured = fidelity(before, after, source, decisions)
    if measured.cosine >= POOR_COSINE:
        return measured
    plain = session_for(pruned, optimize=False, serialized=serialized).run(None, pruned_feeds)
    return _unoptimised_if_changed(measured, before, after, plain, source, decisions)


def _running_level(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> ort.GraphOptimizationLevel:
    """The highest graph-optimisation level, extended at most, at which onnxruntime both builds a
    session for ``model`` and runs it on ``feeds`` (none when no other does). Building is not
    enough: onnxruntime 1.32 builds an extended session for a model whose Resize reads its empty
    ``roi`` and ``scales`` from graph inputs, then fails to run it (see :func:`_run_failure`)."""
    extended = _LEVELS.index(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    for level in _LEVELS[extended:-1]:
        try:
            _session(model, _options(level, 0, None), None).run(None, feeds, quiet_run())
        except Exception:  # onnxruntime's Fail, InvalidGraph, ... derive from Exception alone
            continue
        return level
    return _LEVELS[-1]


def _run_failure(pruned: onnx.ModelProto, serialized: bytes | None, feeds: dict[str, np.ndarray], error: str) -> str:
    """What to say when onnxruntime cannot run the pruned model optimised: an onnxruntime issue
    when it runs without graph optimisations (onnxruntime 1.32 moves a Transpose through a Resize
    whose sizes are constant and gathers from its empty ``roi`` and ``scales`` when those are
    graph inputs), else an internal error. Either way the model is not written: users run it
    optimised."""
    try:
        session_for(pruned, optimize=False, serialized=serialized).run(None, feeds)
    except Exception:
        return f"internal error: onnxruntime cannot run the pruned model ({error}); nothing was written"
    return (f"onnxruntime's graph optimisations cannot run the pruned model ({error}), which runs without them: "
            "an onnxruntime issue, not the pruning's; nothing was written. Try another target")


def _unoptimised_if_changed(measured: Fidelity, before: list[np.ndarray], after: list[np.ndarray],
                            plain: list[np.ndarray], source: str, decisions: list[str | None]) -> Fidelity:
    """The fidelity of the pruned model's unoptimised outputs ``plain``, with the relative change
    ``‖after − plain‖ / ‖plain‖`` as ``optimiser_change``, when onnxruntime's graph optimisations
    change its outputs ``after`` by more than rounding (``OPTIMISER_CHANGE``); else ``measured``.
    The optimiser is not always right: onnxruntime 1.23 to 1.32 fuse a Transpose into a following
    MatMul with a 1-D weight (``FusedMatMul``) and compute another product, in the input model
    as in its pruning, and a poor fidelity would then be the optimiser's, not the pruning's."""
    flat = [np.concatenate([np.asarray(x, np.float64).ravel() for x in outputs]) for outputs in (after, plain)]
    change = float(np.linalg.norm(flat[0] - flat[1]) / max(np.linalg.norm(flat[1]), 1e-30))
    if not change > OPTIMISER_CHANGE:
        return measured
    return replace(fidelity(before, plain, source, decisions), optimiser_change=change)


def verification_inputs(graph: Graph, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """The seeded inputs of the bound shapes that verification runs both models on, and what
    they are, for the report: standard-normal floats (:func:`~spa_compiler.shapes.synthetic_inputs`;
    said as such when every input is one, so that the report does not confuse them with the
    held-out synthetic samples of data-free calibration);
    integers, and floats an embedding table reads, as data-free calibration makes them
    (:func:`~spa_compiler.synthetic_tokens.non_image_input`):
    token ids drawn from the vocabulary's prior where an embedding table reads them, ones for a
    mask, zeros for token types, ``0, 1, ...`` for positions, 8-bit values (bytes, pixels) uniform
    over 0 to 255, zeros otherwise. All-zero token ids
    (padding everywhere) say nothing of a language model: all-MiniLM-L6-v2 pruned to
    ``--flops 0.5`` showed cosine 0.17 on them and 0.95 on held-out sentences."""
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed)
    rng = np.random.default_rng(seed)
    notes = []
    for name, value in feeds.items():
        if not np.issubdtype(value.dtype, np.floating) or embedding_table(graph, name) is not None:
            feeds[name], note = non_image_input(graph, name, value.shape, value.dtype, rng)
            notes.append(note)
    if any("token ids" in note for note in notes):
        return feeds, "synthetic inputs (token ids from the vocabulary's prior)"
    if not notes:
        return feeds, STANDARD_NORMAL
    said = [BYTES] if BYTES in notes else []
    if "zeros" in notes:
        said.append(f"{'integer inputs' if set(notes) == {'zeros'} else 'some integer inputs'} all zero")
    return feeds, "synthetic inputs" + (f" ({'; '.join(said)})" if said else "")


def _numeric(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.number)


def custom_ops(graph: Graph) -> list[str]:
    """``domain::op`` of the nodes outside the standard ONNX domains that onnxruntime has no CPU
    kernel for (its own contrib ops, ``com.microsoft::Attention`` and the like, it runs)."""
    runnable = _onnxruntime_cpu_ops()
    return sorted({
        f"{n.domain}::{n.op_type}" for n in graph.nodes
        if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in runnable
    })


@functools.cache
def _onnxruntime_cpu_ops() -> frozenset[tuple[str, str]]:
    """``(domain, op)`` of every kernel onnxruntime's CPU provider registers."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return frozenset((k.domain, k.op_name) for k in state.get_all_opkernel_def() if k.provider == "CPUExecutionProvider")


LINEAR_OPS = {"MatMul", "Gemm"}


ARG_MAX, THRESHOLD, LABEL = "arg-max", "threshold", "label"
"""The decisions an output holds: the arg-max of class scores along its last axis, each
probability's side of 0.5, or each integer itself (a class label, a token id), kept when equal."""


def decision_outputs(graph: Graph) -> list[str | None]:
    """Per graph output, the decisions it holds (see :data:`ARG_MAX`, :data:`THRESHOLD`), None for
    none. Class scores along the last axis, whose arg-max is a decision: a ``[samples, K]`` output
    (``K >= 2``), or one of higher rank made along its last axis by a Softmax or LogSoftmax, or by
    a linear layer (MatMul, Gemm, or the Add of their bias): a language model's logits, a
    recogniser's per-position characters. Probabilities of a Sigmoid, ``[samples, K]``: a yes or
    no each (a wake word heard, a word boundary, labels of a multi-label classifier), where one
    value per sample has a cosine of 1 whatever it is. Not a LayerNorm's hidden states, whose
    largest feature decides nothing, nor a detector's map of scores (rank 3 or more). Integers
    (a class label, a token id): each value a decision of its own."""
    kinds: list[str | None] = []
    for name in graph.outputs:
        if _integral(onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes.get(name, onnx.TensorProto.FLOAT))):
            kinds.append(LABEL)  # scikit-learn's predicted labels beside its probabilities
            continue
        shape = graph.shapes.get(name, ())
        node = _before_layout(graph, graph.producer.get(name))
        if node is not None and node.op_type == "Add":  # a bias added to a linear layer's output
            linear = [graph.producer.get(x) for x in node.inputs if not graph.is_constant(x)]
            node = linear[0] if len(linear) == 1 else node
        if node is not None and node.op_type == "Sigmoid" and len(shape) == 2:
            kinds.append(THRESHOLD)
            continue
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            default = -1 if graph.opset >= 13 else 1  # before opset 13: over the axes from 1 on, flattened
            along_last = int(node.attr("axis", default)) % len(shape) == len(shape) - 1 if shape else False
        else:
            along_last = node is not None and node.op_type in LINEAR_OPS
        scores = len(shape) >= 2 and shape[-1] >= 2 and (len(shape) == 2 or along_last)
        kinds.append(ARG_MAX if scores else None)
    return kinds


def _before_layout(graph: Graph, node: Node | None) -> Node | None:
    """The producer of what ``node`` only lays out, its last axis kept whole and last (a Reshape
    whose input and output end in the same size, a Transpose that leaves the last axis last,
    ``[T, C] -> [T, 1, C]`` as a recogniser's characters per position come out); else ``node``."""
    while node is not None and node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"):
        before, after = graph.shapes.get(node.inputs[0], ()), graph.shapes.get(node.outputs[0], ())
        keeps_last = bool(before) and bool(after) and before[-1] == after[-1]
        if node.op_type == "Transpose":
            perm = node.attr("perm", list(range(len(before)))[::-1])
            keeps_last = keeps_last and list(perm)[-1] == len(before) - 1
        if not keeps_last:
            return node
        node = graph.producer.get(node.inputs[0])
    return node


def _integral(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _decisions_kept(before: np.ndarray, after: np.ndarray, kind: str) -> tuple[int, int]:
    """(decisions kept, decisions made) of one output of the ``kind`` of :func:`decision_outputs`."""
    if kind == THRESHOLD:
        return int(np.sum((before > 0.5) == (after > 0.5))), int(np.size(before))
    if kind == LABEL:
        return int(np.sum(before == after)), int(np.size(before))
    return int(np.sum(np.argmax(before, -1) == np.argmax(after, -1))), int(np.prod(np.shape(before)[:-1]))


class FidelitySums:
    """The sums :class:`Fidelity` is made of, added batch by batch (outputs whose first axis is
    the sample axis), so the outputs of many samples (a language model's logits) are never held
    together: per-sample cosines and norms, ``Σ‖after − before‖²``, ``Σ‖before‖²``, the largest absolute
    error, and the decisions kept out of those made, over the outputs ``decisions`` marks
    (:func:`decision_outputs`; without it, every integer output's values and the arg-max of every
    other output of rank 2 or more with 2 or more values along its last axis). Integer outputs
    count as decisions only, unless every output is one."""

    def __init__(self, decisions: list[str | None] | None = None) -> None:
        self.decisions_of = decisions
        self.cosines: list[np.ndarray] = []
        self.norms: list[np.ndarray] = []  # per sample: [‖before‖, ‖after‖]
        self.squared_error = self.squared_norm = self.max_abs_error = 0.0
        self.kept = self.decisions = 0

    def add(self, before: list[np.ndarray], after: list[np.ndarray]) -> None:
        firsts = {np.shape(x)[0] if np.ndim(x) else 1 for x in before}
        samples = firsts.pop() if len(firsts) == 1 else 1  # outputs disagreeing on the first axis: one sample

        def per_sample(outputs: list[np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(x, dtype=np.float64).reshape(samples, -1) for x in outputs], axis=1)

        kinds = self.decisions_of or [
            LABEL if _integral(np.asarray(x).dtype) else ARG_MAX if np.ndim(x) >= 2 and np.shape(x)[-1] >= 2 else None
            for x in before
        ]
        # a label's value is a name, not a quantity: the other outputs are compared as numbers
        quantities = [k for k, kind in enumerate(kinds) if kind != LABEL] or list(range(len(before)))
        a, b = per_sample([before[k] for k in quantities]), per_sample([after[k] for k in quantities])
        norms = np.stack([np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)], axis=1)
        products = norms.prod(axis=1)
        cosines = np.divide(np.einsum("ij,ij->i", a, b), products, out=np.ones_like(products), where=products != 0)  # 0/0: 1
        self.cosines.append(cosines)
        self.norms.append(norms)
        self.squared_error += float(np.sum((a - b) ** 2))
        self.squared_norm += float(np.sum(a**2))
        self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(a - b))) if a.size else 0.0)  # NaN stays
        for x, y, kind in zip(before, after, kinds):
            if kind:
                kept, made = _decisions_kept(np.asarray(x), np.asarray(y), kind)
                self.kept += kept
                self.decisions += made

    def result(self, source: str) -> "Fidelity":
        cosines, norms = np.concatenate(self.cosines), np.concatenate(self.norms)
        scale = float(norms.max())
        signal = norms.max(axis=1) >= SILENT * scale
        if not signal.any():  # all zero: nothing to weigh them against
            signal[:] = True
        return Fidelity(
            max_abs_error=self.max_abs_error,
            relative_error=float(np.sqrt(self.squared_error) / max(np.sqrt(self.squared_norm), 1e-30)),
            cosine=float(np.mean(cosines[signal])),
            top1_agreement=self.kept / self.decisions if self.decisions else None,
            samples=len(cosines),
            source=source,
            counted=None if signal.all() else int(signal.sum()),
            scale=scale,
        )


def fidelity(before: list[np.ndarray], after: list[np.ndarray], source: str = "synthetic inputs",
             decisions: list[str | None] | None = None) -> Fidelity:
    """Compare outputs whose first axis is the sample axis (see :class:`Fidelity`)."""
    sums = FidelitySums(decisions)
    sums.add(before, after)
    return sums.result(source)


def held_out_fidelity(original: Graph, pruned: onnx.ModelProto, samples: dict[str, np.ndarray], batch: int,
                      narrow: Narrowing = _unchanged, source: str = "held-out calibration samples",
                      exact: bool = False) -> Fidelity:
    """:func:`fidelity` on held-out samples (keyed by input, first axis samples), run in batches
    of ``batch`` (the declared batch when the model's batch axis is fixed: ``exact``, the last
    batch then topped up to it, :func:`~spa_compiler.sample_layout.padded`) and compared batch by
    batch; ``narrow`` as in :func:`verify_model`; ``source`` says what the samples are."""
    count = len(next(iter(samples.values())))
    reference, weights = reference_session(original)
    session = session_for(free_batch_copy(pruned) if batch > 1 else pruned, layout=False)
    sums = FidelitySums(decision_outputs(original))
    for i in range(0, count, batch):
        feeds = {k: v[i:i + batch] for k, v in samples.items()}
        taken, size = model_feeds(original, padded(feeds, batch if exact else None)), len(next(iter(feeds.values())))
        before = unpadded(reference.run(None, {**taken, **weights}), size, batch if exact else None)
        after = unpadded(session.run(None, {k: narrow(k, v) for k, v in taken.items()}), size, batch if exact else None)
        mask = attention_mask(feeds)  # outputs at padding count for nothing
        sums.add([padding_zeroed(narrow(name, value), mask) for name, value in zip(original.outputs, before)],
                 [padding_zeroed(value, mask) for value in after])
    return sums.result(f"{count} {source}")
