"""Quantized models: exactness of each quantization op rule, and end to end QDQ (quantize_static)
and dynamic (quantize_dynamic) models that stay quantized when pruned.

Exactness here zeroes the removed channels at their source and in their readers, *in the stored
integers* (the zero point, which dequantizes to exactly 0): a channel that is zero leaves a
dynamic quantization range as it was, so the quantized original and the pruned model compute the
same integers and must agree to float rounding. (A removed channel that was not zero can move a
``DynamicQuantizeLinear`` range, as zeroing it would: pruning a dynamically quantized model is
exact with respect to the original with those channels zeroed, not merely unread.)
"""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from helpers import EXAMPLE
from models.exactness import relative_error
from spa_compiler import PruneConfig, load_model, prune, prune_graph, synthetic_inputs
from spa_compiler.errors import UnsupportedModelError
from spa_compiler.report import QUANTIZE_AFTER, fidelity_warning, integer_note, render_report
from spa_compiler.report_files import run_markdown
from spa_compiler.rewrite import rewrite_model
from spa_compiler.verify import run_model

RTOL = 1e-5  # same integers on both sides: only float rounding of the rescaling differs


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _int8(shape, seed: int) -> np.ndarray:
    return _rng(seed).integers(-100, 100, shape).astype(np.int8)


def _scales(n: int, seed: int) -> np.ndarray:
    return _rng(seed).uniform(0.002, 0.02, n).astype(np.float32)


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "q", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _zero_removed_channels(graph, analysis, removed_by_axis) -> None:
    """Make the removed channels zero everywhere: every constant member of their units is set
    to what reads as zero (the zero point of a quantized weight or bias, 0 for a float one);
    quantization scales and zero points stay. Zero at their source, the removed channels also
    leave a dynamic quantization range unchanged. Edits ``graph``'s constants and model."""
    storage = {w.storage: w for w in [*graph.quantized.values(), *graph.integer_weights.values()]}
    params = {name for node in graph.nodes for slot, name in enumerate(node.inputs)
              if slot and node.op_type in ("QuantizeLinear", "DequantizeLinear")
              or slot >= 2 and node.op_type in ("MatMulInteger", "ConvInteger")}
    for axis_id, indices in removed_by_axis.items():
        ref = analysis.axes[axis_id]
        if not graph.is_constant(ref.tensor) or ref.tensor in params or ref.tensor in graph.quantized:
            continue
        value = graph.constants[ref.tensor].copy()
        weight = storage.get(ref.tensor)
        zero = weight.zero(value.shape, value.dtype) if weight is not None else np.zeros_like(value)
        np.moveaxis(value, ref.axis, 0)[indices] = np.moveaxis(zero, ref.axis, 0)[indices]
        graph.constants[ref.tensor] = value
        for tensor in graph.model.graph.initializer:
            if tensor.name == ref.tensor:
                tensor.CopyFrom(numpy_helper.from_array(value, ref.tensor))


def _assert_exact_quantized(tmp_path, model: onnx.ModelProto, **config) -> onnx.ModelProto:
    """Prune half of every group; with the removed channels zeroed (in the stored integers), the
    pruned model reproduces the original. Returns the pruned model."""
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    graph = load_model(path)
    result = prune_graph(graph, PruneConfig(ratio=0.5, round_to=1, verify=False, **config))
    assert result.plan.n_removed > 0
    _zero_removed_channels(graph, result.analysis, result.removed_by_axis)
    pruned = rewrite_model(result.analysis, result.removed_by_axis)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed=3)
    error = relative_error(run_model(graph.model, feeds), run_model(pruned, feeds))
    assert error <= RTOL, f"relative error {error:.3g}"
    return pruned


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _qdq_conv_chain(per_channel: bool) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(W1), DQ(B1)) -> Relu -> Q/DQ -> Conv(DQ(W2)) -> y, int8 weights with
    non-zero zero points (per channel along axis 0, or per tensor), an int32 bias."""
    n1 = 8 if per_channel else 1
    inits = {
        "xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8),
        "hs": np.array(0.05, np.float32), "hz": np.array(3, np.uint8),
        "W1": _int8((8, 3, 3, 3), 1), "W1s": _scales(n1, 2).reshape(() if n1 == 1 else (n1,)),
        "W1z": _int8((n1,), 3).reshape(() if n1 == 1 else (n1,)) // 8,
        "B1": _rng(4).integers(-500, 500, 8).astype(np.int32), "B1s": _scales(8, 5) * 0.02,
        "W2": _int8((4, 8, 3, 3), 6), "W2s": _scales(4, 7), "W2z": _int8((4,), 8) // 8,
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["W1", "W1s", "W1z"], ["w1"], axis=0),
        helper.make_node("DequantizeLinear", ["B1", "B1s"], ["b1"], axis=0),
        helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("QuantizeLinear", ["r1", "hs", "hz"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "hs", "hz"], ["hd"]),
        helper.make_node("DequantizeLinear", ["W2", "W2s", "W2z"], ["w2"], axis=0),
        helper.make_node("Conv", ["hd", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [_float("x", (1, 3, 6, 6))], [_float("y", (1, 4, 6, 6))], inits)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_qdq_conv_exact_and_stays_quantized(tmp_path, per_channel):
    pruned = _assert_exact_quantized(tmp_path, _qdq_conv_chain(per_channel))
    assert _init(pruned, "W1").dtype == np.int8 and _init(pruned, "W1").shape == (4, 3, 3, 3)
    assert _init(pruned, "W2").shape == (4, 4, 3, 3) and _init(pruned, "B1").shape == (4,)
    assert _init(pruned, "B1").dtype == np.int32 and _init(pruned, "B1s").shape == (4,)
    assert _init(pruned, "W1s").shape == ((4,) if per_channel else ())
    assert _init(pruned, "W2s").shape == (4,)  # output channels of the last conv: untouched
    counts = collections.Counter(n.op_type for n in pruned.graph.node)
    assert counts["DequantizeLinear"] == 5 and counts["QuantizeLinear"] == 2


def test_qdq_matmul_per_column_axis_1(tmp_path):
    """A MatMul weight [K, N] quantized along axis 1 (its columns): scale and zero point are
    sliced with the columns, the per-tensor activation parameters stay."""
    inits = {
        "xs": np.array(0.03, np.float32), "xz": np.array(0, np.int8),
        "W1": _int8((6, 10), 1), "W1s": _scales(10, 2), "W1z": _int8((10,), 3) // 10,
        "W2": _int8((10, 5), 4), "W2s": np.array(0.01, np.float32), "W2z": np.array(2, np.int8),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["W1", "W1s", "W1z"], ["w1"], axis=1),
        helper.make_node("MatMul", ["xd", "w1"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("DequantizeLinear", ["W2", "W2s", "W2z"], ["w2"]),
        helper.make_node("MatMul", ["t", "w2"], ["y"]),
    ]
    pruned = _assert_exact_quantized(tmp_path, _model(nodes, [_float("x", (2, 6))], [_float("y", (2, 5))], inits))
    assert _init(pruned, "W1").shape == (6, 5) and _init(pruned, "W1s").shape == (5,)
    assert _init(pruned, "W1z").shape == (5,) and _init(pruned, "W2").shape == (5, 5)
    assert _init(pruned, "W2s").shape == () and _init(pruned, "xs").shape == ()


def _dynamic_rescale(name: str, product: str, x_scale: str, w_scale: str) -> list[onnx.NodeProto]:
    """What quantize_dynamic writes after an integer product: Cast, then times scale_x * scale_w."""
    return [
        helper.make_node("Mul", [x_scale, w_scale], [f"{name}_s"]),
        helper.make_node("Cast", [product], [f"{name}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}_f", f"{name}_s"], [name]),
    ]


def _dynamic_matmul_model() -> onnx.ModelProto:
    """DynamicQuantizeLinear -> MatMulInteger with a per-column weight zero point and scale ->
    bias, Relu -> DynamicQuantizeLinear -> MatMulInteger with per-tensor parameters."""
    inits = {
        "W1": _int8((6, 12), 1), "W1z": _int8((12,), 2) // 10, "W1s": _scales(12, 3),
        "B1": _rng(4).standard_normal(12).astype(np.float32),
        "W2": _int8((12, 4), 5), "W2z": np.array(1, np.int8), "W2s": np.array(0.01, np.float32),
    }
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "W1", "xz", "W1z"], ["p1"]),
        *_dynamic_rescale("m1", "p1", "xs", "W1s"),
        helper.make_node("Add", ["m1", "B1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("DynamicQuantizeLinear", ["r1"], ["hq", "hs", "hz"]),
        helper.make_node("MatMulInteger", ["hq", "W2", "hz", "W2z"], ["p2"]),
        *_dynamic_rescale("y", "p2", "hs", "W2s"),
    ]
    return _model(nodes, [_float("x", (3, 6))], [_float("y", (3, 4))], inits)


def test_dynamic_matmul_integer_exact(tmp_path):
    model = _dynamic_matmul_model()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pruned = _assert_exact_quantized(tmp_path, model)
    assert _init(pruned, "W1").shape == (6, 6) and _init(pruned, "W1").dtype == np.int8
    assert _init(pruned, "W1z").shape == (6,) and _init(pruned, "W1s").shape == (6,)
    assert _init(pruned, "W2").shape == (6, 4) and _init(pruned, "W2z").shape == ()
    graph = load_model(tmp_path / "q.onnx")  # criteria read (q - zero) * scale
    expected = (inits["W1"].astype(np.float64) - inits["W1z"]) * inits["W1s"]
    np.testing.assert_allclose(graph.float_value("W1"), expected, rtol=1e-6)


def _dynamic_conv_model(w1_zero: np.ndarray) -> onnx.ModelProto:
    """DynamicQuantizeLinear -> ConvInteger (uint8 weights) -> Cast/Mul -> bias -> Relu ->
    DynamicQuantizeLinear -> ConvInteger -> Cast/Mul."""
    inits = {
        "W1": _rng(1).integers(0, 255, (8, 3, 3, 3)).astype(np.uint8), "W1z": w1_zero,
        "W1s": np.array(0.01, np.float32), "B1": _rng(2).standard_normal((1, 8, 1, 1)).astype(np.float32),
        "W2": _rng(3).integers(0, 255, (4, 8, 3, 3)).astype(np.uint8), "W2z": np.array(120, np.uint8),
        "W2s": np.array(0.02, np.float32),
    }
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "W1", "xz", "W1z"], ["p1"], pads=[1, 1, 1, 1]),
        *_dynamic_rescale("m1", "p1", "xs", "W1s"),
        helper.make_node("Add", ["m1", "B1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("DynamicQuantizeLinear", ["r1"], ["hq", "hs", "hz"]),
        helper.make_node("ConvInteger", ["hq", "W2", "hz", "W2z"], ["p2"], pads=[1, 1, 1, 1]),
        *_dynamic_rescale("y", "p2", "hs", "W2s"),
    ]
    return _model(nodes, [_float("x", (1, 3, 5, 5))], [_float("y", (1, 4, 5, 5))], inits)


def test_dynamic_conv_integer_exact(tmp_path):
    """Per-tensor zero points: the only ones onnxruntime's ConvInteger runs."""
    pruned = _assert_exact_quantized(tmp_path, _dynamic_conv_model(np.array(128, np.uint8)))
    assert _init(pruned, "W1").shape == (4, 3, 3, 3) and _init(pruned, "W1").dtype == np.uint8
    assert _init(pruned, "B1").shape == (1, 4, 1, 1) and _init(pruned, "W2").shape == (4, 4, 3, 3)
    assert _init(pruned, "W1z").shape == ()


def test_conv_integer_per_filter_zero_point_is_sliced_with_the_filters(tmp_path):
    """The ONNX spec allows a zero point per output channel (onnxruntime does not run it, so
    this checks the rewrite, not outputs)."""
    zero = _rng(9).integers(100, 150, 8).astype(np.uint8)
    onnx.save(_dynamic_conv_model(zero), str(tmp_path / "q.onnx"))
    result = prune_graph(load_model(tmp_path / "q.onnx"), PruneConfig(ratio=0.5, round_to=1, verify=False))
    pruned = rewrite_model(result.analysis, result.removed_by_axis)
    kept = np.setdiff1d(np.arange(8), result.removed_by_axis[result.analysis.axis_id("W1", 0)])
    np.testing.assert_array_equal(_init(pruned, "W1z"), zero[kept])
    np.testing.assert_array_equal(_init(pruned, "W1"), _init(onnx.load(str(tmp_path / "q.onnx")), "W1")[kept])


@pytest.mark.accurate
def test_accurate_pipeline_requantizes_refitted_weights(tmp_path):
    """obs, measured sensitivity and re-fit on a QDQ model: re-fitted weights are written back
    as int8 with the original scales and zero points, and the outputs stay close."""
    model = _qdq_conv_chain(per_channel=True)
    onnx.save(model, str(tmp_path / "q.onnx"))
    report = prune(tmp_path / "q.onnx", tmp_path / "out.onnx", PruneConfig(ratio=0.25, round_to=1, bench_runs=0))
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    kept = [c.kept[0] for c in report.initializers if c.name == "W1"][0]
    assert len(kept) == 6
    assert _init(pruned, "W2").dtype == np.int8
    np.testing.assert_array_equal(_init(pruned, "W2s"), _init(model, "W2s"))  # same grid
    refitted = {c.name for c in report.initializers if c.compensated}
    assert "W2" in refitted and "w2" not in refitted
    original_w2 = np.take(_init(model, "W2"), kept, axis=1)
    assert not np.array_equal(_init(pruned, "W2"), original_w2)  # compensated, then re-quantized
    assert report.fidelity.cosine >= 0.95
    assert report.requantized[0] == len(refitted) >= 1 and report.requantized[1] >= 0


def _poor(report):
    """``report`` as if its outputs had moved far (cosine 0.5), to see the warning it would print."""
    return replace(report, fidelity=replace(report.fidelity, cosine=0.5), held_out_fidelity=None)


def _rescaled_by_division(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its output's integer product rescaled by a Div instead of quantize_dynamic's
    Mul: a rescaling spa-prune does not read, so that weight's scale is unknown."""
    for node in model.graph.node:
        if node.output[0] == "y":
            node.op_type = "Div"
    return model


@pytest.mark.accurate
def test_dynamic_weights_are_compensated_and_quantized_again(tmp_path):
    """The default pipeline fits a dynamic weight in floats, from the statistics of the float
    tensor its DynamicQuantizeLinear reads, and stores it quantized again on its own grid:
    ConvInteger's uint8 W2 at scale 0.02 and zero point 120. Held-out cosine 0.905 against
    0.755 for the fast pipeline, which compensates nothing (measured)."""
    onnx.save(_dynamic_conv_model(np.array(128, np.uint8)), str(tmp_path / "q.onnx"))
    report = prune(tmp_path / "q.onnx", tmp_path / "out.onnx", PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert report.integer_weights == 0 and integer_note(report) is None
    assert {c.name for c in report.initializers if c.compensated} >= {"W2"}
    assert report.requantized[0] >= 1
    model, pruned = onnx.load(str(tmp_path / "q.onnx")), onnx.load(str(tmp_path / "out.onnx"))
    assert _init(pruned, "W2").dtype == np.uint8
    assert (_init(pruned, "W2s"), _init(pruned, "W2z")) == (_init(model, "W2s"), _init(model, "W2z"))
    kept = [c.kept[1] for c in report.initializers if c.name == "W2"][0]
    assert not np.array_equal(_init(pruned, "W2"), np.take(_init(model, "W2"), kept, axis=1))
    prune(tmp_path / "q.onnx", tmp_path / "fast.onnx",
          PruneConfig(ratio=0.5, round_to=1, bench_runs=0, criterion="l2", allocation="score", refit_rounds=0))
    feeds = {"x": _rng(7).standard_normal((16, 1, 3, 5, 5)).astype(np.float32)}

    def cosine(path) -> float:
        """Mean cosine of the outputs to the original's on 16 seeded samples."""
        pairs = [(run_model(model, {"x": x})[0].ravel(), run_model(onnx.load(str(path)), {"x": x})[0].ravel())
                 for x in feeds["x"]]
        return float(np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in pairs]))

    assert cosine(tmp_path / "out.onnx") >= 0.88 and cosine(tmp_path / "fast.onnx") <= 0.8


@pytest.mark.accurate
def test_dynamic_weights_without_a_float_view_are_named_with_what_to_do(tmp_path):
    """A dynamic weight whose product is rescaled otherwise than by quantize_dynamic's Mul has
    no known scale: the default pipeline leaves it uncompensated, the report counts it, says so,
    and its advice puts pruning the float model before quantizing it first. The fast pipeline,
    which compensates nothing anyway, does not add the note; a float model never does."""
    onnx.save(_rescaled_by_division(_dynamic_conv_model(np.array(128, np.uint8))), str(tmp_path / "q.onnx"))
    report = prune(tmp_path / "q.onnx", tmp_path / "out.onnx", PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert report.integer_weights == 1 and "W2" not in {c.name for c in report.initializers if c.compensated}
    assert report.calibration.startswith("data-free")
    note = integer_note(report)
    assert note.startswith("quantized: 1 weights are read by integer products") and QUANTIZE_AFTER in note
    console = Console(record=True, width=1000)
    render_report(report, console)
    assert note in console.export_text() and f"- {note}" in run_markdown(report, None)
    assert fidelity_warning(_poor(report)).startswith(
        f"warning: the pruned model's outputs differ markedly from the original's; {QUANTIZE_AFTER}, give real samples")
    fast = prune(tmp_path / "q.onnx", tmp_path / "fast.onnx",
                 PruneConfig(ratio=0.5, round_to=1, bench_runs=0, criterion="l2", allocation="score", refit_rounds=0))
    assert fast.integer_weights == 1 and integer_note(fast) is None
    floats = prune(EXAMPLE, tmp_path / "float.onnx", PruneConfig(ratio=0.5, bench_runs=0))
    assert floats.integer_weights == 0 and integer_note(floats) is None
    assert QUANTIZE_AFTER not in fidelity_warning(_poor(floats))


def _blockwise_model() -> onnx.ModelProto:
    inits = {"W": _int8((8, 4, 3, 3), 1), "Ws": _scales(8 * 2 * 9, 2).reshape(8, 2, 3, 3)}
    nodes = [helper.make_node("DequantizeLinear", ["W", "Ws"], ["w"], axis=1, block_size=2),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    return _model(nodes, [_float("x", (1, 4, 5, 5))], [_float("y", (1, 8, 3, 3))], inits, opset=21)


def _qlinear_model() -> onnx.ModelProto:
    inits = {"xs": np.array(0.1, np.float32), "xz": np.array(0, np.uint8), "w": _int8((8, 3, 3, 3), 1),
             "ws": np.array(0.1, np.float32), "wz": np.array(0, np.int8),
             "ys": np.array(0.1, np.float32), "yz": np.array(0, np.uint8)}
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qconv")]
    u8 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.UINT8, shape)  # noqa: E731
    return _model(nodes, [u8("x", [1, 3, 5, 5])], [u8("y", [1, 8, 3, 3])], inits)


def _dequantized_conv(storage: np.ndarray, domain: str = "") -> onnx.ModelProto:
    inits = {"W": storage, "Ws": np.array(0.01, np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["W", "Ws"], ["w"], name="dq", domain=domain),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    model = _model(nodes, [_float("x", (1, 4, 5, 5))], [_float("y", (1, 8, 3, 3))], inits, opset=21)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


@pytest.mark.parametrize("build, message", [
    (_blockwise_model, r"DequantizeLinear node .* quantizes block-wise"),
    (_qlinear_model, r"QLinearConv node 'qconv' is in the QOperator format"),
    (lambda: _dequantized_conv(_int8((8, 4, 3, 3), 1), "com.microsoft"),
     r"com.microsoft::DequantizeLinear node 'dq' \(a contrib-domain quantizer"),
    (lambda: _dequantized_conv(_rng(1).integers(0, 9, (8, 4, 3, 3)).astype(np.uint16)),
     r"DequantizeLinear node 'dq' reads UINT16 weights"),
], ids=["block-wise", "qoperator", "contrib-domain", "uint16"])
def test_formats_not_understood_are_refused_by_name(tmp_path, build, message):
    onnx.save(build(), str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(tmp_path / "m.onnx")


# -- end to end: onnxruntime's own quantizers ------------------------------------------------------

FAST_HALF = dict(flops=0.5)


def _op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("arch", ["mobilenet_v2_tiny", "resnet_tiny_basic"])
def test_static_qdq_zoo_model_prunes_and_stays_quantized(exported, tmp_path, arch):
    from models.quantize import compare, integer_initializers, run_outputs, static_qdq

    source = exported(arch)
    quantized = static_qdq(source, tmp_path / "qdq.onnx")
    feeds = {"input": _rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)}
    figures = compare(source, quantized, tmp_path, run_outputs(feeds), **FAST_HALF)
    assert 0.47 <= figures["quantized_flops_ratio"] <= 0.52
    assert figures["quantized_flops_ratio"] == pytest.approx(figures["float_flops_ratio"], abs=0.01)
    pruned = tmp_path / "quantized_pruned.onnx"
    onnx.checker.check_model(str(pruned), full_check=True)
    assert integer_initializers(pruned) == integer_initializers(quantized) > 20
    before, after = _op_counts(quantized), _op_counts(pruned)
    assert after["QuantizeLinear"] == before["QuantizeLinear"] > 10
    assert after["DequantizeLinear"] == before["DequantizeLinear"]
    initializers = onnx.load(str(pruned)).graph.initializer
    floats = [t.name for t in initializers if t.data_type == TensorProto.FLOAT and len(t.dims) > 1]
    assert not floats, f"weights written as floats: {floats}"
    assert figures["cosine_pruned"] >= 0.98  # measured 0.99998 (MobileNetV2) and 0.995 (ResNet)


@pytest.mark.real_model
def test_dynamic_minilm_prunes_and_stays_quantized(tmp_path):
    from models.quantize import compare, dynamic_int8, integer_initializers, run_outputs
    from models.real import export_minilm

    shapes = {name: (1, 16) for name in ("input_ids", "attention_mask", "token_type_ids")}
    source = tmp_path / "minilm.onnx"  # folded once, so that neither prune folds it again
    onnx.save(load_model(export_minilm(tmp_path / "exported.onnx", seq_len=16), shapes).model, str(source))
    quantized = dynamic_int8(source, tmp_path / "dynamic.onnx")
    ids = _rng(0).integers(1000, 5000, (4, 16)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    figures = compare(source, quantized, tmp_path, run_outputs(feeds), input_shapes=shapes, **FAST_HALF)
    assert 0.48 <= figures["quantized_flops_ratio"] <= 0.52
    pruned = tmp_path / "quantized_pruned.onnx"
    before, after = _op_counts(quantized), _op_counts(pruned)
    assert after["MatMulInteger"] == before["MatMulInteger"] == 36
    assert after["DynamicQuantizeLinear"] == before["DynamicQuantizeLinear"] > 0
    assert integer_initializers(pruned) == integer_initializers(quantized)
    assert figures["cosine_pruned"] >= 0.95  # measured 0.984; the unpruned pair agree at 0.946


def test_parameters_count_each_quantized_weight_once(tmp_path):
    """A QDQ weight counts once, by its float value (not also by its int8 storage); an integer
    op's weight counts although it is not a float; zero points are not parameters."""
    from spa_compiler.analysis import analyze_graph
    from spa_compiler.cost import CostModel

    onnx.save(_qdq_conv_chain(per_channel=True), str(tmp_path / "qdq.onnx"))
    qdq = CostModel(analyze_graph(load_model(tmp_path / "qdq.onnx")), "params").total
    assert qdq == 8 * 27 + 8 + 4 * 72 + (8 + 8 + 4) + 2  # weights, bias, per-channel and activation scales
    onnx.save(_dynamic_matmul_model(), str(tmp_path / "dynamic.onnx"))
    dynamic = CostModel(analyze_graph(load_model(tmp_path / "dynamic.onnx")), "params").total
    assert dynamic == 6 * 12 + 12 + 12 + 12 * 4 + 1  # W1, its scales, bias, W2, its scale


def test_reinit_of_a_quantized_model_is_refused(tmp_path):
    from spa_compiler.errors import InputError

    onnx.save(_qdq_conv_chain(per_channel=True), str(tmp_path / "q.onnx"))
    with pytest.raises(InputError, match="--reinit .* this model is quantized"):
        prune(tmp_path / "q.onnx", tmp_path / "out.onnx", PruneConfig(ratio=0.5, reinit=True, bench_runs=0))
    assert not (tmp_path / "out.onnx").exists()


def test_zeroed_integer_weight_slabs_dequantize_to_zero(tmp_path):
    """What sensitivity measurements write into an integer weight to emulate removing input
    channels: the zero point, per column here, so the slabs read as exactly 0."""
    from spa_compiler.quantized import zero_slabs

    onnx.save(_dynamic_matmul_model(), str(tmp_path / "q.onnx"))
    graph = load_model(tmp_path / "q.onnx")
    weight = graph.integer_weights["W1"]
    value = graph.constants["W1"].copy()
    zero_slabs(graph, "W1", value, 0, np.array([1, 4]))
    dequantized = weight.dequantize(value)
    np.testing.assert_array_equal(dequantized[[1, 4]], 0)
    np.testing.assert_array_equal(dequantized[[0, 2, 3, 5]], weight.dequantize(graph.constants["W1"])[[0, 2, 3, 5]])


def test_float_values_for_a_dynamic_weight_are_quantized_on_its_grid(tmp_path):
    """Float values meant for a dynamic weight are quantized at its scale and zero point (per
    column here); where its scale is unknown they stop the rewrite instead of turning it into a
    float initializer."""
    from spa_compiler.errors import VerificationError
    from spa_compiler.quantized import requantize

    onnx.save(_dynamic_matmul_model(), str(tmp_path / "q.onnx"))
    graph = load_model(tmp_path / "q.onnx")
    values = graph.float_value("W1") + 0.3 * graph.integer_weights["W1"].scale  # a third of a step off
    stored = requantize(graph, {"W1": values})["W1"]
    np.testing.assert_array_equal(stored, graph.constants["W1"])
    assert requantize(graph, {"B1": np.ones(12, np.float32)})["B1"].dtype == np.float32
    onnx.save(_rescaled_by_division(_dynamic_matmul_model()), str(tmp_path / "unknown.onnx"))
    graph = load_model(tmp_path / "unknown.onnx")
    with pytest.raises(VerificationError, match="float values for integer constant 'W2'"):
        requantize(graph, {"W2": np.zeros((12, 4), np.float32)})


def test_the_scale_is_found_on_either_side_of_the_rescaling(tmp_path):
    """``Cast(product) * scale`` or ``scale * Cast(product)``: the weight's scale and its float
    view are found either way."""
    from spa_compiler.quantized import float_product

    model = _dynamic_matmul_model()
    for node in model.graph.node:
        if node.output[0] == "y":
            node.input[0], node.input[1] = node.input[1], node.input[0]
    onnx.save(model, str(tmp_path / "q.onnx"))
    graph = load_model(tmp_path / "q.onnx")
    assert graph.integer_weights["W2"].scale == np.float32(0.01)
    assert float_product(graph, graph.consumers["W2"][0]) == ("r1", "y")


def test_latency_profile_charges_fused_qlinearconv_kernels_to_their_conv(tmp_path):
    """onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into a QLinearConv named
    ``<conv>_token_<n>``; its kernel time belongs to the Conv (so --latency can prune it)."""
    from spa_compiler.profiling import attribute_kernel

    model = _qdq_conv_chain(per_channel=True)
    for k, node in enumerate(model.graph.node):
        node.name = f"n{k}_{node.op_type}"
    onnx.save(model, str(tmp_path / "q.onnx"))
    graph = load_model(tmp_path / "q.onnx")
    compute = {n.name for n in graph.nodes if n.op_type == "Conv"}
    assert attribute_kernel(graph, compute, "n4_Conv_token_7", "QLinearConv") == "n4_Conv"
    assert attribute_kernel(graph, compute, "n9_Conv_token_12", "QLinearConv") == "n9_Conv"


def test_requantized_weights_keep_the_range_of_the_original_values(tmp_path):
    """A re-fitted weight is quantized again within the range its stored values span, not the
    integer type's: 7-bit weights (onnxruntime's reduce_range) stay 7-bit, values beyond are
    clipped to that range and counted as saturated."""
    from spa_compiler.quantized import requantize, saturation, stored_range

    model = _qdq_conv_chain(per_channel=True)
    seven_bit = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W2")) // 2
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W2"))
    model.graph.initializer.append(numpy_helper.from_array(seven_bit.astype(np.int8), "W2"))
    onnx.save(model, str(tmp_path / "q.onnx"))
    graph = load_model(tmp_path / "q.onnx")
    low, high = stored_range(graph.constants["W2"])
    assert -50 <= low < 0 < high <= 50  # the seeded int8 values (-100 to 99) halved
    weight = graph.quantized["w2"]
    doubled = 2 * weight.dequantize(graph.constants["W2"])  # re-fitted values twice the original
    stored = requantize(graph, {"w2": doubled})["W2"]
    assert stored.dtype == np.int8 and stored.min() == low and stored.max() == high
    scale = weight._along(weight.scale, 4)
    zero_point = weight._along(weight.zero_point, 4)
    expected = np.clip(np.rint(doubled.astype(np.float64) / scale) + zero_point, low, high)
    np.testing.assert_array_equal(stored, expected)
    assert np.count_nonzero(expected != np.rint(doubled.astype(np.float64) / scale) + zero_point) > 50  # clipped
    at_ends = int(np.count_nonzero((stored == low) | (stored == high)))
    before = int(np.count_nonzero((graph.constants["W2"] == low) | (graph.constants["W2"] == high)))
    assert saturation(graph, {"w2": doubled}) == (1, at_ends - before) and at_ends - before > 50
