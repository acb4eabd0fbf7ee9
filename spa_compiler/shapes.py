"""Shapes: binding the dynamic dimensions of graph inputs (``--input-shape``), inferring a
concrete shape for every tensor (ONNX shape inference on a weightless copy, onnxruntime for the
rest), and seeded inputs of the bound shapes."""

from __future__ import annotations

import logging
import re
import shlex

import numpy as np
import onnx
from onnx import helper

from .errors import InputError, ModelError, first_line
from .proto_copy import copy_without_initializers
from .subgraphs import all_initializers, inner_value_infos

__all__ = [
    "parse_input_shapes", "input_shape_option", "dims_text", "bind_input_shapes", "with_free_axes", "shape_skeleton", "weights_as_inputs", "large_float", "synthetic_inputs",
    "infer_shapes", "declared_batch", "free_batch", "free_batch_copy", "sample_axes",
]

BATCH = "batch"

log = logging.getLogger(__name__)


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` strings (the ``--input-shape`` option)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise InputError(
                f"--input-shape '{spec}' is not of the form NAME=1x3x224x224"
            )
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def dims_text(shape: tuple[int, ...]) -> str:
    """``(1, 3, 224, 224)`` as ``1x3x224x224``, the way ``--input-shape`` writes sizes."""
    return "x".join(str(size) for size in shape)


def input_shape_option(name: str, shape: tuple[int, ...]) -> str:
    """The ``--input-shape`` argument that :func:`parse_input_shapes` reads back as ``{name: shape}``."""
    return f"--input-shape {shlex.quote(f'{name}={dims_text(shape)}')}"


ANONYMOUS = ("", "?")  # dim_params that name no size (Paddle's exports write "?")


def sample_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The axis of each graph input (initializers aside) that holds its samples; None for a
    scalar, one value for every sample (a sample rate). Exporters name the batch axis: the name
    the inputs' first axes carry marks it wherever an input has it (an RNN's initial state
    ``[directions, batch, hidden]``). Without it: the first axis when it is free or 1, else the
    first axis of size 1 (``[2, 1, 128]``), else the first free axis, else the first."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {value.name: list(value.type.tensor_type.shape.dim) for value in model.graph.input
              if value.name not in initializers}
    batch = next((dims[0].dim_param for dims in inputs.values()
                  if dims and dims[0].dim_value <= 0 and dims[0].dim_param not in ANONYMOUS), None)

    def axis_of(dims: list) -> int | None:
        if not dims:
            return None
        named = [axis for axis, dim in enumerate(dims) if batch and dim.dim_param == batch and dim.dim_value <= 0]
        ones = [axis for axis, dim in enumerate(dims) if dim.dim_value == 1]
        free = [axis for axis, dim in enumerate(dims) if dim.dim_value <= 0]
        if named:
            return named[0]
        if dims[0].dim_value in (0, 1):
            return 0
        return (ones or free or [0])[0]

    return {name: axis_of(dims) for name, dims in inputs.items()}


def bind_input_shapes(
    model: onnx.ModelProto, user: dict[str, tuple[int, ...]], data: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Every graph input's concrete shape: as ``user`` (``--input-shape``) gives it; else per axis
    its fixed size, the size ``user`` gave an axis of the same name (a ``dim_param`` such as
    ``sequence``: binding ``input_ids`` binds ``attention_mask`` too), 1 for the batch (the
    input's sample axis, :func:`sample_axes`), or the size in ``data``, the shapes of calibration
    arrays (as the model takes them) by input name, or for a one-input model any arrays of one
    shape after the samples (a folder of ``.npy`` files). Free axes nothing binds are one error
    that says how to bind them."""
    initializers = {t.name for t in model.graph.initializer}
    samples = sample_axes(model)
    real_inputs = [i for i in model.graph.input if i.name not in initializers]
    unknown = set(user) - {i.name for i in real_inputs}
    if unknown:
        names = ", ".join(i.name for i in real_inputs)
        raise InputError(
            f"--input-shape names {', '.join(sorted(unknown))}, which is not a graph input; "
            f"the inputs are: {names}"
        )
    for value in real_inputs:
        if not value.type.HasField("tensor_type"):
            raise ModelError(f"graph input '{value.name}' is not a tensor; spa-prune needs tensor inputs")
    bound = {value.name: _user_shape(value, user[value.name]) for value in real_inputs if value.name in user}
    named = {dim.dim_param: size for value in real_inputs if value.name in bound
             for dim, size in zip(value.type.tensor_type.shape.dim, bound[value.name])
             if dim.dim_value <= 0 and dim.dim_param not in ANONYMOUS}
    unbound = []
    for value in real_inputs:
        if value.name in bound:
            continue
        given = _data_shape(value, real_inputs, data or {})
        shape = [_axis_size(axis == samples[value.name], dim, named, given and given[axis])
                 for axis, dim in enumerate(value.type.tensor_type.shape.dim)]
        if None in shape:
            unbound.append(value)
        else:
            bound[value.name] = tuple(shape)
    if unbound:
        raise ModelError(_unbound_message(unbound, samples))
    return bound


def _user_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as ``--input-shape`` gave it for ``value``, checked against the model's sizes."""
    dims = value.type.tensor_type.shape.dim
    if len(shape) != len(dims):
        raise InputError(f"--input-shape {value.name} has {len(shape)} dimensions; the model's input has {len(dims)}")
    for axis, (dim, size) in enumerate(zip(dims, shape)):
        if dim.dim_value > 0 and dim.dim_value != size:
            raise InputError(f"--input-shape {value.name}: dimension {axis} is fixed to {dim.dim_value} in the "
                             f"model, not {size}")
    return tuple(shape)


def _data_shape(value: onnx.ValueInfoProto, real_inputs: list, data: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The calibration array's shape for ``value`` (see :func:`bind_input_shapes`), checked for rank."""
    given = data.get(value.name)
    if given is None and data and len(real_inputs) == 1 and len({tuple(d[1:]) for d in data.values()}) == 1:
        given = next(iter(data.values()))
    rank = len(value.type.tensor_type.shape.dim)
    if given is not None and len(given) != rank:
        raise InputError(f"calibration array '{value.name}' has shape {tuple(given)}; the model input has "
                         f"{rank} dimensions (samples first)")
    return given


def _axis_size(batch: bool, dim, named: dict[str, int], given: int | None) -> int | None:
    """One axis's size by the rules of :func:`bind_input_shapes` (``batch``: the sample axis,
    ``given``: the calibration array's size there); None when nothing binds it."""
    if dim.dim_value > 0:
        return dim.dim_value
    if dim.dim_param in named:
        return named[dim.dim_param]
    if batch:
        return 1
    return int(given) if given is not None else None


def _unbound_message(unbound: list[onnx.ValueInfoProto], samples: dict[str, int | None]) -> str:
    """One line: the first free axis, the other inputs left free, and the ``--input-shape``
    options that bind them all (one input per named axis: the others take its size)."""
    def free(value):
        return [(axis, dim.dim_param) for axis, dim in enumerate(value.type.tensor_type.shape.dim)
                if axis != samples[value.name] and dim.dim_value <= 0]

    def example(value):
        return "x".join(str(d.dim_value) if d.dim_value > 0 else ("1" if i == samples[value.name] else "N")
                        for i, d in enumerate(value.type.tensor_type.shape.dim))

    covered, needed = set(), []
    for value in unbound:
        names = {name for _, name in free(value)}
        if names & set(ANONYMOUS) or names - covered:
            needed.append(value)
            covered |= names
    axis, name = free(unbound[0])[0]
    text = f"graph input '{unbound[0].name}' has an unknown dimension {axis} ('{name or '?'}')"
    if len(unbound) > 1:
        text += f", as do {', '.join(v.name for v in unbound[1:])}"
    options = " ".join(f"--input-shape {value.name}={example(value)}" for value in needed)
    shared = " (the others share its named dimensions)" if len(needed) < len(unbound) else ""
    return f"{text}; bind {'it' if len(unbound) == 1 else 'them'} with {options}{shared}"


def with_free_axes(model: onnx.ModelProto) -> set[str]:
    """The graph inputs with a free axis besides the sample axis (the ones a batch of one does not bind)."""
    samples = sample_axes(model)
    return {value.name for value in model.graph.input if value.name in samples
            and any(dim.dim_value <= 0 for axis, dim in enumerate(value.type.tensor_type.shape.dim) if axis != samples[value.name])}


def shape_skeleton(
    model: onnx.ModelProto, bound: dict[str, tuple[int, ...]], strip_weights: bool = True
) -> onnx.ModelProto:
    """A copy with inputs bound to concrete shapes and intermediate shapes cleared. With
    ``strip_weights`` (for shape inference, which needs their shapes, not their values) large
    float weights become graph inputs of their shapes; their bytes are never copied."""
    copy = weights_as_inputs(model, {t.name for t in model.graph.initializer if strip_weights and large_float(t)})
    for value in copy.graph.input:
        if value.name in bound:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, bound[value.name]):
                dim.Clear()
                dim.dim_value = size
    del copy.graph.value_info[:]
    for value in copy.graph.output:
        if value.type.HasField("tensor_type"):  # reading tensor_type of a sequence or map would make it one
            value.type.tensor_type.ClearField("shape")
    return copy


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs of their shapes instead,
    made without copying their bytes."""
    copy = copy_without_initializers(model, names)
    listed = {i.name for i in copy.graph.input}
    copy.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer if t.name in names and t.name not in listed
    )
    return copy


def large_float(tensor: onnx.TensorProto) -> bool:
    """A float tensor of more than 64 elements: a weight, never a shape."""
    return (
        tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        and np.prod(tensor.dims) > 64
    )


def _shape_of(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return None if any(d < 0 for d in dims) else dims


def synthetic_inputs(
    input_shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs of the bound shapes: standard normal floats, zeros for integers/bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in input_shapes.items():
        np_type = helper.tensor_dtype_to_np_dtype(dtypes[name])
        if np.issubdtype(np_type, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(np_type)
        else:
            feeds[name] = np.zeros(shape, dtype=np_type)
    return feeds


def infer_shapes(
    model: onnx.ModelProto, bound: dict[str, tuple[int, ...]], dtypes: dict[str, int]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Concrete shapes of every tensor: ONNX shape inference, then onnxruntime for the rest."""
    bound_model = shape_skeleton(model, bound)
    try:
        inferred = onnx.shape_inference.infer_shapes(bound_model, strict_mode=False, data_prop=True)
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
        inferred = bound_model
    shapes: dict[str, tuple[int, ...]] = dict(bound)
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inner_value_infos(inferred.graph)]:
        shape = _shape_of(value)
        if shape is not None:
            shapes[value.name] = shape
        if value.type.tensor_type.elem_type:
            dtypes[value.name] = value.type.tensor_type.elem_type
    for init in all_initializers(model.graph):
        shapes[init.name] = tuple(init.dims)
    for value in [*model.graph.value_info, *model.graph.output, *inner_value_infos(model.graph)]:
        declared = _shape_of(value)
        if declared is not None and value.name not in shapes:
            shapes[value.name] = declared
    _dropout_masks(model, shapes, dtypes)
    missing = [
        out for node in model.graph.node for out in node.output if out and out not in shapes
    ]
    if missing:
        shapes.update(_run_for_shapes(shape_skeleton(model, bound, strip_weights=False), missing, bound, dtypes))
    return shapes, dtypes


def _dropout_masks(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int]) -> None:
    """A Dropout's mask has the shape of its data (every opset); its type is the data's before
    opset 10, boolean from it. ONNX's inference leaves the mask unset before opset 10, and
    onnxruntime would otherwise run the whole model, weights and all, for it."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for node in model.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len(node.output) > 1:
            data, mask = node.input[0], node.output[1]
            if mask and mask not in shapes and data in shapes:
                shapes[mask] = shapes[data]
                if data in dtypes:
                    dtypes.setdefault(mask, dtypes[data] if opset < 10 else onnx.TensorProto.BOOL)


def _run_for_shapes(
    model: onnx.ModelProto,
    names: list[str],
    bound: dict[str, tuple[int, ...]],
    dtypes: dict[str, int],
) -> dict[str, tuple[int, ...]]:
    from .verify import quiet_run, session_for

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    try:
        outputs = session_for(probe, optimize=False).run(names, synthetic_inputs(bound, dtypes), quiet_run())
    except Exception as exc:
        # e.g. a custom op: the nodes touching these tensors become barriers
        log.warning("shapes of %d tensors unknown (e.g. '%s'): %s", len(names), names[0], first_line(exc))
        return {}
    found = {}
    for name, value in zip(names, outputs):
        found[name] = tuple(np.asarray(value).shape)
        dtypes.setdefault(name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype))
    return found


def declared_batch(model: onnx.ModelProto) -> int | None:
    """The size the main graph's first input with a sample axis (:func:`sample_axes`) fixes there:
    1 for most exports without dynamic axes, the example's batch for some; None where it leaves
    that axis free. (The first: copies that feed weights as inputs list them after the model's
    own.)"""
    initializers, samples = {t.name for t in model.graph.initializer}, sample_axes(model)
    for value in model.graph.input:
        if value.name in initializers:
            continue
        axis = samples.get(value.name)
        if axis is not None:
            dim = value.type.tensor_type.shape.dim[axis]
            return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
    return None


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare, in place, the sample axis (:func:`sample_axes`) of the main graph's inputs where
    it is the declared batch ``n`` (:func:`declared_batch`; 1 when there is none), and the first
    axis of size ``n`` of its outputs, as the symbolic ``batch``, and leave a first dimension of
    ``n`` of its value infos unknown (an intermediate tensor's leading ``n`` need not be the
    samples'); returns ``model``. A free dimension accepts any size, so a dimension of ``n``
    that is not a sample axis stays valid at its value."""
    samples, size = sample_axes(model), declared_batch(model) or 1
    for values, declared in ((model.graph.input, True), (model.graph.output, True), (model.graph.value_info, False)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            sized = [axis for axis, dim in enumerate(dims) if dim.HasField("dim_value") and dim.dim_value == size]
            axis = samples.get(value.name, sized[0] if sized and declared else 0)
            if axis is None or axis not in sized:
                continue
            if declared:
                dims[axis].dim_param = BATCH
            else:
                dims[axis].ClearField("dim_value")
    return model


def free_batch_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with :func:`free_batch` applied; its weights' bytes are copied."""
    return free_batch(copy_without_initializers(model, set()))
