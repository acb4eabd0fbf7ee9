"""Distillation: a pruned model trained toward its original's outputs, on inputs without labels.

Pruning without fine-tuning keeps what the calibration data can restore by least squares; a few
epochs of training recover more. :func:`distill` needs neither labels nor training code: the
original model is the teacher. On the training samples (arrays of the model's inputs, as
``--calib`` reads them) the pruned model, converted with :func:`~spa_compiler.torch.to_torch`,
is trained with AdamW (learning rate decayed to 0 on a cosine) to lower

    L = Σ_o  Σ_i m_i ‖y_o,i − y*_o,i‖² / Σ_i m_i ‖y*_o,i‖²

summed over the model's outputs ``o``, ``y*`` the teacher's: each output's squared error relative
to its own size, so outputs of different scales weigh alike. ``i`` runs over the samples of a
batch and, for an output laid out ``[samples, tokens, ...]`` under a ``[samples, tokens]``
attention mask input, over its tokens, ``m`` being that mask (padding does not count); ``m = 1``
elsewhere. The module trains in eval mode: BatchNorm keeps its statistics, dropout stays off.

Few token sequences (fewer than ``COPIES_UP_TO`` training samples of a model reading an
embedding table) are topped up to that many with copies, ``MAX_COPIES`` per sequence at most,
in which 40% of the inner tokens are replaced by ids drawn from the vocabulary's prior
(:mod:`~spa_compiler.token_augment`, as ``--calib`` does); the held-out samples are never
copied. all-MiniLM-L6-v2 pruned to half its FLOPs with 128 calibration sentences and distilled
three epochs on those same sentences (112, 16 held out) keeps cosine 0.952 to the original
embeddings without copies (11 s) and 0.956 with 896 (47 s); on written sentences unlike the
calibration's, 0.901 and 0.907.

Without data, a model of a vocabulary spa-prune recognises trains on the English sentences that
ship with it (:mod:`~spa_compiler.known_text`; axes the model leaves free bound to the longest
sentence, or as the caller binds them): all-MiniLM-L6-v2 pruned data-free to half its FLOPs,
0.930 -> 0.942 in three epochs, 0.947 in ten, with no data anywhere.

Batches are of ``BATCH_SIZE`` samples. A pruned model that declares its batch (an export
without dynamic axes: most write 1, some the example's size; or ``--input-shape``) trains on
batches all the same when it computes each sample on its own
(:func:`~spa_compiler.batch_axis.fixed_batch`), converted from a copy whose batch is free; else
on batches of exactly its declared size (MTCNN's stages flatten with a Reshape to ``[4, -1]``),
each epoch's last few samples, fewer than that, left out (the order is drawn anew each epoch).
Every onnxruntime run of a model that declares its batch holds exactly that many samples, the
last topped up with copies (:func:`~spa_compiler.sample_layout.padded`). The teacher's outputs
are computed once and held, unless they take more than ``TARGET_BYTES``: then each batch's are
computed as it is trained on. The distilled model declares the batch the pruned one did.

The trained module is exported back to ONNX (opset 17, the pruned model's input and output names,
traced). Axes the pruned model leaves free (the samples', a sequence length) stay free when the
export reproduces the module on the samples cut to half their size along them; otherwise (a
shape the trace recorded as a constant) only the samples' axis stays free and any other is fixed
to the data's size, which the result lists. It is run with onnxruntime
on held-out samples (the last ``HELD_OUT_SHARE`` of them, a batch of another size than the traced
one): it must reproduce the trained module there (``EXPORT_TOLERANCE``), and ``L`` is measured for
the pruned and the distilled file alike. The distilled model is written only if it reproduces the
module and its held-out ``L`` is lower; otherwise the pruned model is written unchanged, and the
result says which and why.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..batch_axis import fixed_batch
from ..distill_data import HELD_OUT_SHARE, DistillData, distillation_data, onnx_session
from ..ir import load_model
from ..known_text import SHIPPED
from ..model_files import save_model
from ..sample_layout import padded, unpadded
from ..shapes import free_batch_copy
from ..token_augment import REPLACED, TokenCopies, with_copies_to
from ..token_mask import attention_mask
from .convert import to_torch

__all__ = ["DistillResult", "distill", "distill_checked", "distillation_loss", "export_module", "HELD_OUT_SHARE", "BATCH_SIZE", "OPSET"]

BATCH_SIZE = 32  # samples per step (the declared batch for a model that cannot compute other batches)
OPSET = 17  # of the exported distilled model
WEIGHT_DECAY = 1e-4
COPIES_UP_TO = 1024  # training token sequences that copies top a smaller set up to
TARGET_BYTES = 1 << 30  # teacher outputs held in memory at most; beyond, computed batch by batch
EXPORT_TOLERANCE = 1e-4  # of the largest output magnitude: the export must reproduce the trained module


@dataclass(frozen=True)
class DistillResult:
    """Held-out relative error ``L`` of the pruned (``before``) and the distilled (``after``)
    model, which of them was written, and what the training saw."""

    before: float
    after: float
    written: str  # "distilled" or "pruned"
    samples: int
    held_out: int
    epochs: int
    seconds: float
    fixed_axes: tuple[str, ...] = ()  # "name[axis]=size": symbolic axes the distilled model fixes
    export_mismatch: str | None = None  # why the exported distilled model was not trusted
    copies: int = 0  # copies of the training sequences with tokens replaced, trained on besides them
    data: str = ""  # where the samples came from: the --data path, or SHIPPED

    @property
    def summary(self) -> str:
        if self.export_mismatch is not None:
            verdict = f"the exported distilled model {self.export_mismatch}: the pruned model is written unchanged"
            error = f"{self.before:.4g} before distillation"
        else:
            verdict = ("written" if self.written == "distilled"
                       else "not lower: the pruned model is written unchanged")
            error = f"{self.before:.4g} -> {self.after:.4g}"
        fixed = (f"; its axes {', '.join(self.fixed_axes)} are fixed to the data's sizes (exported with them "
                 "free, it did not run or differed at other sizes)") if self.fixed_axes else ""
        copies = f" and {self.copies} copies with {REPLACED:.0%} of their tokens replaced" if self.copies else ""
        source = f" ({self.data})" if self.data == SHIPPED else ""
        epochs = f"{self.epochs} epoch{'s' * (self.epochs != 1)}"
        return (f"held-out relative error {error} ({verdict}){fixed}; {epochs} on {self.samples} "
                f"samples{source}{copies}, {self.held_out} held out, {self.seconds:.0f} s")


def _mask_weights(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
    if mask is not None and output.ndim >= 2 and tuple(output.shape[:2]) == tuple(mask.shape):
        return mask.reshape(*mask.shape, *([1] * (output.ndim - 2)))
    return 1.0


def distillation_loss(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L`` of the module docstring: ``Σ_o Σ m ‖y − y*‖² / Σ m ‖y*‖²`` (``mask`` float, [samples, tokens])."""
    total = torch.zeros(())
    for output, target in zip(outputs, targets):
        weights = _mask_weights(output, mask)
        total = total + (weights * (output - target) ** 2).sum() / (weights * target**2).sum().clamp_min(1e-12)
    return total


def distill(pruned: str | Path, teacher: str | Path, data: str | Path | None, output: str | Path, epochs: int = 3,
            learning_rate: float = 1e-4, seed: int = 0,
            progress: Callable[[int, int, float], None] | None = None, token_copies: bool = True,
            input_shapes: dict[str, tuple[int, ...]] | None = None) -> DistillResult:
    """Train the model at ``pruned`` toward the one at ``teacher`` on the inputs in ``data`` (an
    ``.npz`` or a folder of ``.npy``, as ``--calib``; None: the shipped English sentences, for a
    model of a vocabulary spa-prune recognises) and write the better of the two by held-out
    error to ``output`` (module docstring). ``progress(step, steps, loss)`` is called after
    every step. ``token_copies``: few token sequences are topped up with copies (module
    docstring). ``input_shapes`` binds free axes for the shipped sentences. Raises :class:`~spa_compiler.errors.InputError` for inputs that do not fit."""
    prepared = distillation_data(pruned, teacher, data, output, input_shapes, seed)
    return distill_checked(prepared, output, epochs, learning_rate, seed, progress, token_copies)


def distill_checked(prepared: DistillData, output: str | Path, epochs: int = 3, learning_rate: float = 1e-4,
                    seed: int = 0, progress: Callable[[int, int, float], None] | None = None,
                    token_copies: bool = True) -> DistillResult:
    """:func:`distill` on samples :func:`~spa_compiler.distill_data.distillation_data` checked."""
    started = time.perf_counter()
    pruned, teacher, output, train, test = prepared.pruned, prepared.teacher, Path(output), prepared.train, prepared.test
    samples, held_out = (len(next(iter(part.values()))) for part in (train, test))
    proto = onnx.load(str(pruned), load_external_data=False)
    declared = _declared_batch(onnx_session(pruned))  # what every run holds
    graph = load_model(pruned, {name: (declared or 1, *np.shape(array)[1:]) for name, array in train.items()})
    copies = with_copies_to(graph, train, COPIES_UP_TO, seed) if token_copies else TokenCopies(train)
    train = copies.data
    exact = declared if declared and fixed_batch(graph) else None  # samples every step of the module holds
    targets = _TeacherOutputs(teacher, train)
    before = _held_out_error(pruned, teacher, test)
    with tempfile.TemporaryDirectory() as folder:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx2torch's notes on deprecated indexing and the like
            module = _train(_trainable(pruned, bool(declared) and not exact, Path(folder)), train, targets,
                            exact or BATCH_SIZE, bool(exact), epochs, learning_rate, seed, progress)
        distilled, fixed = export_module(module, proto, train, Path(folder) / "distilled.onnx", declared)
        mismatch = _export_mismatch(module, distilled, test, exact)
        after = _held_out_error(distilled, teacher, test) if mismatch is None else float("nan")
        better = mismatch is None and after < before
        save_model(onnx.load(str(distilled if better else pruned)), output)
    return DistillResult(before, after, "distilled" if better else "pruned", samples, held_out, epochs,
                         time.perf_counter() - started, fixed if better else (), mismatch, copies.copies,
                         prepared.source)


def _trainable(pruned: Path, free_batch: bool, folder: Path) -> torch.nn.Module:
    """The pruned model in PyTorch; converted from a copy whose declared batch is free when
    ``free_batch`` (the model computes each sample on its own: it trains on batches)."""
    if not free_batch:
        return to_torch(pruned)
    copy = folder / "batched.onnx"
    onnx.save(free_batch_copy(onnx.load(str(pruned))), str(copy))
    return to_torch(copy)


def _run(session: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``session``'s model on ``arrays``, in runs of 64 samples, or of exactly
    the batch the model declares (:func:`_declared_batch`, :func:`_in_runs`)."""
    names = [i.name for i in session.get_inputs()]
    declared = _declared_batch(session)
    return _in_runs(lambda run: session.run(None, {name: run[name] for name in names}), arrays, declared or 64,
                    declared)


def _declared_batch(session: ort.InferenceSession) -> int | None:
    """The samples every run of ``session``'s model holds: the first dimension its first input
    fixes, else 1 where an input or output fixes a first dimension of 1; None when it is free."""
    first = session.get_inputs()[0].shape
    if first and isinstance(first[0], int) and first[0] > 0:
        return first[0]
    return 1 if any(v.shape and v.shape[0] == 1 for v in (*session.get_inputs(), *session.get_outputs())) else None


def _in_runs(compute: Callable[[dict[str, np.ndarray]], Sequence], arrays: dict[str, np.ndarray], step: int,
             exact: int | None) -> list[np.ndarray]:
    """``compute``'s outputs on ``arrays`` run ``step`` samples at a time, joined; with ``exact``
    every run holds exactly that many, the last topped up with copies of its last sample
    (:func:`~spa_compiler.sample_layout.padded`) and its outputs cut back to the samples given.
    Outputs are copied out of each run (onnxruntime may return a fed array's memory)."""
    count, runs = len(next(iter(arrays.values()))), []
    for start in range(0, count, step):
        run = {name: array[start:start + step] for name, array in arrays.items()}
        outputs = compute(padded(run, exact))
        runs.append([np.array(value) for value in unpadded(list(outputs), min(step, count - start), exact)])
    return [np.concatenate(parts) for parts in zip(*runs)]


class _TeacherOutputs:
    """The teacher's outputs on the training samples, by sample index: computed once and held
    when they take at most ``TARGET_BYTES``, else computed for each batch as it is trained on
    (a detector's full-resolution maps over thousands of pages)."""

    def __init__(self, teacher: Path, arrays: dict[str, np.ndarray]) -> None:
        self.session, self.arrays = onnx_session(teacher), arrays
        count = len(next(iter(arrays.values())))
        per_sample = sum(o.nbytes for o in _run(self.session, {k: v[:1] for k, v in arrays.items()}))
        self.held = _run(self.session, arrays) if per_sample * count <= TARGET_BYTES else None

    def __getitem__(self, index: np.ndarray) -> list[torch.Tensor]:
        if self.held is not None:
            return [torch.from_numpy(t[index]) for t in self.held]
        return [torch.from_numpy(t) for t in _run(self.session, {k: v[index] for k, v in self.arrays.items()})]


def _float_mask(arrays: dict[str, np.ndarray]) -> torch.Tensor | None:
    mask = attention_mask(arrays)
    return None if mask is None else torch.from_numpy(mask.astype(np.float32))


def _held_out_error(path: Path, teacher: Path, arrays: dict[str, np.ndarray]) -> float:
    outputs = [torch.from_numpy(o) for o in _run(onnx_session(path), arrays)]
    targets = [torch.from_numpy(t) for t in _run(onnx_session(teacher), arrays)]
    return float(distillation_loss(outputs, targets, _float_mask(arrays)))


def _train(module: torch.nn.Module, arrays: dict[str, np.ndarray], targets: _TeacherOutputs, batch_size: int,
           whole_batches: bool, epochs: int, learning_rate: float, seed: int,
           progress: Callable[[int, int, float], None] | None) -> torch.nn.Module:
    """``module`` trained on ``arrays`` toward ``targets``, ``batch_size`` samples a step (with
    ``whole_batches``, exactly that many: each epoch's remainder is left out)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    names = list(arrays)
    inputs = [torch.from_numpy(arrays[name]) for name in names]
    mask = _float_mask(arrays)
    count = len(inputs[0])
    batches = count // batch_size if whole_batches else math.ceil(count / batch_size)
    steps = epochs * batches
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    module.eval()  # BatchNorm statistics kept, dropout off; gradients flow all the same
    step = 0
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, batches * batch_size, batch_size):
            index = order[start:start + batch_size].numpy()
            produced = module(*(x[index] for x in inputs))
            produced = list(produced) if isinstance(produced, (tuple, list)) else [produced]
            loss = distillation_loss(produced, targets[index], None if mask is None else mask[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if progress is not None:
                progress(step, steps, loss.item())
    return module


def export_module(module: torch.nn.Module, proto: onnx.ModelProto, arrays: dict[str, np.ndarray], path: Path,
                  declared: int | None = None) -> tuple[Path, tuple[str, ...]]:
    """``module`` exported to ``path`` with the pruned model's input and output names, traced on
    two samples (on its ``declared`` batch when the pruned model declares one, which the export keeps). Every
    axis the pruned model leaves free stays free when the export, run on the samples cut to half
    their size along those axes, reproduces the module there (a trace records shapes as the
    module computes them, or as constants); else only the samples' axis stays free, any other
    is fixed to the traced size (as are axes of size 1, which cannot be cut), and those are
    returned as ``name[axis]=size``."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    sample = {v.name: arrays[v.name][: declared or 2] for v in inputs}
    free = {value.name: {axis: dim.dim_param or ("samples" if axis == 0 else f"{value.name}_{axis}")
                         for axis, dim in enumerate(value.type.tensor_type.shape.dim)
                         if not (dim.HasField("dim_value") and dim.dim_value > 0)}  # -1 or 0, as Paddle writes, is free
            for value in [*inputs, *proto.graph.output]}
    batch_only = {name: {0: axes[0]} for name, axes in free.items() if 0 in axes}
    fixed = tuple(f"{name}[{axis}]={sample[name].shape[axis]}" for name, axes in free.items() if name in sample
                  for axis in axes if axis)
    halved = _halved(sample, free)
    if any(halved[name].shape != array.shape for name, array in sample.items()):
        _trace(module, inputs, proto, sample, free, path)
        if _export_mismatch(module, path, halved, declared) is None:
            return path, ()
    _trace(module, inputs, proto, sample, batch_only, path)
    return path, fixed


def _trace(module: torch.nn.Module, inputs: list[onnx.ValueInfoProto], proto: onnx.ModelProto,
           sample: dict[str, np.ndarray], dynamic: dict[str, dict[int, str]], path: Path) -> None:
    """``module`` traced on ``sample`` into ``path``, the axes ``dynamic`` names left free, its
    inputs and outputs named as the pruned model's: traced under placeholder names, then renamed
    (:func:`_renamed`), since the tracer refuses a name that is a number, as the TorchScript
    exporter names the outputs it was not told to name."""
    real = [v.name for v in inputs] + [v.name for v in proto.graph.output]
    placeholders = [f"spa_input_{k}" for k in range(len(inputs))] + [f"spa_output_{k}" for k in range(len(proto.graph.output))]
    placeholder = dict(zip(real, placeholders))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on values it records as constants
        torch.onnx.export(module, tuple(torch.from_numpy(sample[v.name]) for v in inputs), str(path), dynamo=False,
                          opset_version=OPSET, input_names=placeholders[: len(inputs)],
                          output_names=placeholders[len(inputs):],
                          dynamic_axes={placeholder[name]: axes for name, axes in dynamic.items() if axes} or None)
    traced = onnx.load(str(path))
    _renamed(traced.graph, dict(zip(placeholders, real)))
    onnx.save(traced, str(path))


def _renamed(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Every reference in ``graph`` (and the subgraphs of its nodes) to a tensor ``names`` maps
    renamed to what it maps to; any other tensor already bearing one of the new names first
    takes that name with ``.traced`` appended (a trace numbers its tensors)."""
    taken = set(names.values()) - set(names)
    moved = {**{name: f"{name}.traced" for name in taken}, **names}

    def rename(part: onnx.GraphProto) -> None:
        for node in part.node:
            node.input[:] = [moved.get(name, name) for name in node.input]
            node.output[:] = [moved.get(name, name) for name in node.output]
            for attribute in node.attribute:
                for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    rename(subgraph)
        for value in (*part.input, *part.output, *part.value_info, *part.initializer):
            value.name = moved.get(value.name, value.name)

    rename(graph)


def _halved(sample: dict[str, np.ndarray], free: dict[str, dict[int, str]]) -> dict[str, np.ndarray]:
    """``sample`` cut to the first half (at least one) along every free axis past the samples'."""
    return {name: array[tuple(slice(0, max(1, size // 2)) if axis and axis in free.get(name, {}) else slice(None)
                              for axis, size in enumerate(array.shape))]
            for name, array in sample.items()}


def _export_mismatch(module: torch.nn.Module, path: Path, arrays: dict[str, np.ndarray], exact: int | None) -> str | None:
    """None when the exported model at ``path`` gives the module's outputs on ``arrays`` (a batch
    other than the traced one) within ``EXPORT_TOLERANCE`` of their largest magnitude; else why not.
    The module runs ``exact`` samples at a time where it must, as it trained."""
    try:
        exported, trained = _run(onnx_session(path), arrays), _run_module(module, arrays, exact)
    except Exception as exc:  # onnxruntime's or torch's own error types: the trace baked in a shape
        return f"fails on the held-out samples ({' '.join(str(exc).split())[:200]})"
    for ours, theirs in zip(exported, trained):
        scale = max(float(np.abs(theirs).max()), 1e-12)
        if ours.shape != theirs.shape or np.abs(ours - theirs).max() > EXPORT_TOLERANCE * scale:
            return "differs from the trained module on the held-out samples"
    return None


def _run_module(module: torch.nn.Module, arrays: dict[str, np.ndarray], exact: int | None) -> list[np.ndarray]:
    """Every output of ``module`` on ``arrays`` (in input order), ``BATCH_SIZE`` samples at a
    time, or exactly ``exact`` (:func:`_in_runs`)."""
    def compute(run: dict[str, np.ndarray]) -> list[np.ndarray]:
        produced = module(*(torch.from_numpy(a) for a in run.values()))
        return [t.numpy() for t in (produced if isinstance(produced, (tuple, list)) else [produced])]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx2torch's notes on deprecated indexing and the like
        return _in_runs(compute, arrays, exact or BATCH_SIZE, exact)
