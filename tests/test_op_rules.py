"""Every op rule has an exactness test.

Each test builds a tiny model from text (``onnx.parser``) with seeded numpy weights:
``Conv(3 -> C) -> [op under test] -> consumer Conv/Gemm/MatMul -> output``. The exactness harness
(``helpers.assert_exact``) chooses channels with the pruning plan (``--ratio 0.5``, rounding 1),
zeroes the consumer weight slabs that read them, prunes, and compares onnxruntime outputs of the
zeroed original and the pruned model on seeded inputs (relative L2 error <= 1e-4). Beyond
exactness the tests assert the numbers a rule rewrites: sliced weight shapes, ``group`` and
``num_groups``, split sizes, slice bounds, gather indices, reshape targets and resize sizes.

Barrier tests check that channels an op mixes (LRN, Softmax or ReduceSum over channels, unknown
custom ops, ...) are never pruned, with exact unit counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import helper, numpy_helper

from helpers import assert_exact, randomize_weights
from spa_compiler import Graph, PruneConfig, analyze_graph, load_model, prune_graph, registered_ops

CONFIG = PruneConfig(ratio=0.5, round_to=1, min_keep=0.1, verify=True)
RTOL = 1e-4
INT64_MAX = np.iinfo(np.int64).max

# The producer every exactness model starts with: x[1,3,8,8] -> a[1,8,8,8].
CONV = "a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)"
X = "float[1,3,8,8] x"


# -- building and pruning tiny models --------------------------------------------------------

def const(shape, seed: int = 1, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Seeded float32 values: standard normal, or uniform in [low, high)."""
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def i32(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def f32(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def make_model(graph_text: str, opset: int, consts: dict[str, object],
               domains: dict[str, int] | None = None) -> onnx.ModelProto:
    """Parse ``graph_text`` and add ``consts`` as initializers; a tuple is a shape to fill with
    seeded normal floats, an array is used as is (0-d arrays give scalars)."""
    imports = [("", opset), *(domains or {}).items()]
    header = ", ".join(f'"{d}" : {v}' for d, v in imports)
    ir = helper.find_min_ir_version_for(
        [helper.make_opsetid(d, v) for d, v in imports], ignore_unknown=True
    )
    model = onnx.parser.parse_model(f"<ir_version: {ir}, opset_import: [{header}]>\n{graph_text}")
    for k, (name, value) in enumerate(consts.items()):
        array = const(value, seed=100 + k) if isinstance(value, tuple) else np.asarray(value)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    return model


def load(tmp_path: Path, model: onnx.ModelProto, seed: int = 0) -> Graph:
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    return randomize_weights(load_model(path), seed)


def build(tmp_path: Path, graph_text: str, opset: int, consts: dict[str, object], **kw) -> Graph:
    return load(tmp_path, make_model(graph_text, opset, consts, **kw))


def prune_exact(graph: Graph):
    """The plan the exactness check uses, and the pruned model it checked."""
    result = prune_graph(graph, CONFIG)  # before assert_exact zeroes anything: the same plan
    pruned = assert_exact(graph, CONFIG, rtol=RTOL)
    return result, pruned


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise AssertionError(f"no initializer '{name}' in the pruned model")


def shapes_of(model: onnx.ModelProto, names) -> dict[str, tuple[int, ...]]:
    return {name: tuple(initializer(model, name).shape) for name in names}


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    found = [n for n in model.graph.node if n.op_type == op_type]
    assert found, f"no {op_type} node in the model"
    return found


def attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def input_value(model: onnx.ModelProto, node: onnx.NodeProto, slot: int) -> np.ndarray:
    return initializer(model, node.input[slot])


def removed(result, tensor: str, axis: int) -> np.ndarray:
    """Indices the plan removes from ``tensor``'s ``axis``."""
    axis_id = result.analysis.axis_id(tensor, axis)
    found = result.removed_by_axis.get(axis_id) if axis_id is not None else None
    return np.asarray(found if found is not None else [], dtype=np.int64)


def group_of(analysis, tensor: str, axis: int):
    """The group holding ``tensor``'s ``axis`` (None when no group does)."""
    axis_id = analysis.axis_id(tensor, axis)
    matches = [g for g in analysis.groups if axis_id in g.axes]
    assert len(matches) <= 1
    return matches[0] if matches else None


def weaken(graph: Graph, slabs: dict[tuple[str, int], list[int]], factor: float = 1e-2) -> None:
    """Scale the given slices (``(tensor, axis) -> indices``) so the plan removes those channels."""
    for (name, axis), indices in slabs.items():
        value = graph.constants[name].copy()
        np.moveaxis(value, axis, 0)[indices] *= factor
        graph.set_constant(name, value)


def chain(body: str, out: str, inputs: str = X) -> str:
    """A graph ``inputs => out`` whose body starts with the producer conv."""
    lines = "\n".join(f"    {line.strip()}" for line in [CONV, *body.strip().splitlines()])
    return f"g ({inputs}) => ({out}) {{\n{lines}\n}}"


def case(case_id: str, opset: int, body: str, out: str, consts: dict, expect: dict):
    """One exactness case; ``expect`` maps initializer names to their shapes after pruning."""
    return pytest.param(opset, body, out, consts, expect, id=case_id)


def check_exact_case(tmp_path, opset, body, out, consts, expect):
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), **consts}
    graph = build(tmp_path, chain(body, out), opset, consts)
    result, pruned = prune_exact(graph)
    assert shapes_of(pruned, expect) == expect
    return graph, result, pruned


# Most cases: 8 channels, of which ratio 0.5 removes 4; the producer conv shrinks to 4 filters.
W1_HALF = {"W1": (4, 3, 3, 3), "B1": (4,)}
Y4 = "float[1,4,8,8] y"
CONSUMER = "y = Conv (h, W2)"
W2 = {"W2": (4, 8, 1, 1)}
W2_HALF = {**W1_HALF, "W2": (4, 4, 1, 1)}


# -- Conv and ConvTranspose ------------------------------------------------------------------

CONV_CASES = [
    case("conv_bias", 13, "h = Relu(a)\n" + CONSUMER, Y4, W2, W2_HALF),
    case("conv_no_bias_3x3", 13, "h = Conv <pads = [1, 1, 1, 1]> (a, Wb)\n" + CONSUMER, Y4,
         {"Wb": (8, 8, 3, 3), **W2}, {**W2_HALF, "Wb": (4, 4, 3, 3)}),
    case("conv_consumer_bias_3x3", 13,
         "h = Relu(a)\ny = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)", Y4,
         {"W2": (4, 8, 3, 3), "B2": (4,)}, {**W1_HALF, "W2": (4, 4, 3, 3), "B2": (4,)}),
    case("depthwise", 13,
         "h = Conv <group = 8, pads = [1, 1, 1, 1]> (a, Wd, Bd)\n" + CONSUMER, Y4,
         {"Wd": (8, 1, 3, 3), "Bd": (8,), **W2}, {**W2_HALF, "Wd": (4, 1, 3, 3), "Bd": (4,)}),
    case("depthwise_multiplier2", 13,
         "h = Conv <group = 8, pads = [1, 1, 1, 1]> (a, Wd)\n" + CONSUMER, Y4,
         {"Wd": (16, 1, 3, 3), "W2": (4, 16, 1, 1)},
         {**W1_HALF, "Wd": (8, 1, 3, 3), "W2": (4, 8, 1, 1)}),
    case("strided_dilated", 13,
         "h = Conv <strides = [2, 2], dilations = [2, 2], pads = [2, 2, 2, 2]> (a, Wb, Bb)\n" + CONSUMER,
         "float[1,4,4,4] y", {"Wb": (8, 8, 3, 3), "Bb": (8,), **W2},
         {**W2_HALF, "Wb": (4, 4, 3, 3), "Bb": (4,)}),
]


@pytest.mark.parametrize("opset, body, out, consts, expect", CONV_CASES)
def test_conv_exact(tmp_path, opset, body, out, consts, expect):
    check_exact_case(tmp_path, opset, body, out, consts, expect)


def test_conv1d(tmp_path):
    text = """g (float[1,3,16] x) => (float[1,4,16] y) {
        a = Conv <pads = [1, 1]> (x, Wa)
        h = Conv <pads = [1, 1]> (a, Wc)
        y = Conv (h, W2)
    }"""
    graph = build(tmp_path, text, 13, {"Wa": (8, 3, 3), "Wc": (6, 8, 3), "W2": (4, 6, 1)})
    _, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["Wa", "Wc", "W2"]) == {"Wa": (4, 3, 3), "Wc": (3, 4, 3), "W2": (4, 3, 1)}


GROUPED = [
    # (producer filters, group, W shape, W after, group after, producer filters after)
    pytest.param(16, 2, (16, 8, 3, 3), (8, 4, 3, 3), 2, 8, id="few_wide_groups_2x8"),
    pytest.param(16, 8, (16, 2, 3, 3), (8, 2, 3, 3), 4, 8, id="many_narrow_groups_8x2"),
    pytest.param(8, 4, (16, 2, 3, 3), (8, 2, 3, 3), 2, 4, id="whole_groups_expanding_4x(2->4)"),
    pytest.param(8, 2, (16, 4, 3, 3), (8, 2, 3, 3), 2, 4, id="positions_expanding_2x(4->8)"),
]


@pytest.mark.parametrize("c_in, group, w_shape, w_after, group_after, w1_rows", GROUPED)
def test_grouped_conv(tmp_path, c_in, group, w_shape, w_after, group_after, w1_rows):
    """Many narrow groups leave whole (``group`` drops); few wide groups lose the same positions
    in every group (``group`` stays, channels per group drop)."""
    c_out = w_shape[0]
    text = f"""g ({X}) => (float[1,4,8,8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        h = Conv <group = {group}, pads = [1, 1, 1, 1]> (a, Wg, Bg)
        r = Relu (h)
        y = Conv (r, W2)
    }}"""
    consts = {"W1": (c_in, 3, 3, 3), "B1": (c_in,), "Wg": w_shape, "Bg": (c_out,), "W2": (4, c_out, 1, 1)}
    graph = build(tmp_path, text, 13, consts)
    _, pruned = prune_exact(graph)
    assert attr(nodes(pruned, "Conv")[1], "group") == group_after
    assert shapes_of(pruned, ["W1", "Wg", "Bg", "W2"]) == {
        "W1": (w1_rows, 3, 3, 3), "Wg": w_after, "Bg": (w_after[0],), "W2": (4, w_after[0], 1, 1),
    }


CONV_TRANSPOSE = [
    # (group, W shape [Ci, Co/g, k, k], W after, group after, Co after)
    pytest.param(1, (8, 6, 3, 3), (4, 3, 3, 3), 1, 3, id="group1"),
    pytest.param(4, (8, 2, 3, 3), (4, 2, 3, 3), 2, 4, id="whole_groups_4x2"),
    pytest.param(2, (8, 4, 3, 3), (4, 2, 3, 3), 2, 4, id="positions_2x4"),
]


@pytest.mark.parametrize("group, w_shape, w_after, group_after, co_after", CONV_TRANSPOSE)
def test_conv_transpose(tmp_path, group, w_shape, w_after, group_after, co_after):
    c_out = w_shape[1] * group
    text = f"""g ({X}) => (float[1,4,16,16] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        h = ConvTranspose <group = {group}, strides = [2, 2], pads = [1, 1, 0, 0]> (a, Wt, Bt)
        y = Conv (h, W2)
    }}"""
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), "Wt": w_shape, "Bt": (c_out,), "W2": (4, c_out, 1, 1)}
    graph = build(tmp_path, text, 13, consts)
    _, pruned = prune_exact(graph)
    assert attr(nodes(pruned, "ConvTranspose")[0], "group", 1) == group_after
    assert shapes_of(pruned, ["W1", "Wt", "Bt", "W2"]) == {
        "W1": (4, 3, 3, 3), "Wt": w_after, "Bt": (co_after,), "W2": (4, co_after, 1, 1),
    }


def test_conv_conv_widths(tmp_path):
    """Conv(3->8) -> Conv(8->8) -> Conv(8->4): both hidden widths halve, the output stays."""
    text = f"""g ({X}) => ({Y4}) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        b = Conv <pads = [1, 1, 1, 1]> (a, Wb, Bb)
        y = Conv (b, W2)
    }}"""
    graph = build(tmp_path, text, 13, {"W1": (8, 3, 3, 3), "B1": (8,), "Wb": (8, 8, 3, 3), "Bb": (8,), **W2})
    result, pruned = prune_exact(graph)
    groups = result.analysis.groups
    assert [(len(g.units), len(g.prunable)) for g in groups] == [(8, 8), (8, 8), (4, 0)]
    assert result.plan.removed.keys() == {0, 1} and all(len(v) == 4 for v in result.plan.removed.values())
    assert shapes_of(pruned, ["W1", "B1", "Wb", "Bb", "W2"]) == {
        "W1": (4, 3, 3, 3), "B1": (4,), "Wb": (4, 4, 3, 3), "Bb": (4,), "W2": (4, 4, 1, 1),
    }
    kept = np.setdiff1d(np.arange(8), removed(result, "W1", 0))
    np.testing.assert_array_equal(initializer(pruned, "W1"), graph.constants["W1"][kept])


# -- normalisations --------------------------------------------------------------------------

NORM_CASES = [
    case("BatchNormalization", 13,
         "n = BatchNormalization <epsilon = 0.001> (a, S, Bn, M, V)\nh = Relu(n)\n" + CONSUMER, Y4,
         {"S": (8,), "Bn": (8,), "M": (8,), "V": (8,), **W2},
         {**W2_HALF, "S": (4,), "Bn": (4,), "M": (4,), "V": (4,)}),
    case("InstanceNormalization", 13,
         "h = InstanceNormalization (a, S, Bn)\n" + CONSUMER, Y4,
         {"S": (8,), "Bn": (8,), **W2}, {**W2_HALF, "S": (4,), "Bn": (4,)}),
    case("LayerNormalization_last_axis", 17,
         "h = LayerNormalization <axis = -1> (a, Ln, Lb)\n" + CONSUMER, Y4,
         {"Ln": const((8,), 7), "Lb": const((8,), 8), **W2},
         {**W2_HALF, "Ln": (8,), "Lb": (8,)}),
]


@pytest.mark.parametrize("opset, body, out, consts, expect", NORM_CASES)
def test_norm_exact(tmp_path, opset, body, out, consts, expect):
    check_exact_case(tmp_path, opset, body, out, consts, expect)


@pytest.mark.parametrize("opset, param_len, param_after", [
    pytest.param(18, 4, 2, id="opset18_scale_per_group"),
    pytest.param(21, 8, 4, id="opset21_scale_per_channel"),
])
def test_group_normalization(tmp_path, opset, param_len, param_after):
    """8 channels in 4 groups: units are whole groups of 2 channels; half of them leave and
    ``num_groups`` becomes 2."""
    text = chain("h = GroupNormalization <num_groups = 4, epsilon = 0.001> (a, Gs, Gb)\n" + CONSUMER, Y4)
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), "Gs": const((param_len,), 3),
              "Gb": const((param_len,), 4), **W2}
    graph = build(tmp_path, text, opset, consts)
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (4, 4)
    assert all(len(u.members[result.analysis.axis_id("W1", 0)]) == 2 for u in group.units)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4 and np.all(gone[0::2] % 2 == 0) and np.all(gone[1::2] == gone[0::2] + 1)  # whole groups
    assert attr(nodes(pruned, "GroupNormalization")[0], "num_groups") == 2
    assert shapes_of(pruned, ["Gs", "Gb", "W1", "W2"]) == {
        "Gs": (param_after,), "Gb": (param_after,), "W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}


def test_group_normalization_opset18_rule_without_deprecation_check(tmp_path, monkeypatch):
    """onnx >= 1.16 deprecates GroupNormalization-18 (its checker rejects any opset 18-20 model
    using it, the original too) although onnxruntime runs it. Accepting exactly that checker
    error shows the opset-18 rule (scale per group) itself is exact."""
    real_check = onnx.checker.check_model

    def check_model(model, *args, **kwargs):
        try:
            real_check(model, *args, **kwargs)
        except onnx.checker.ValidationError as exc:
            if "GroupNormalization is deprecated" not in str(exc):
                raise

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    test_group_normalization(tmp_path, 18, 4, 2)


# -- element-wise ops --------------------------------------------------------------------------

UNARY = [
    ("Relu", "h = Relu(a)", 13, {}),
    ("Sigmoid", "h = Sigmoid(a)", 13, {}),
    ("Tanh", "h = Tanh(a)", 13, {}),
    ("HardSigmoid", "h = HardSigmoid <alpha = 0.3, beta = 0.4> (a)", 13, {}),
    ("HardSwish", "h = HardSwish(a)", 14, {}),
    ("LeakyRelu", "h = LeakyRelu <alpha = 0.1> (a)", 13, {}),
    ("Clip_inputs", "h = Clip(a, lo, hi)", 13, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    ("Clip_max_only", 'h = Clip(a, "", hi)', 13, {"hi": np.float32(0.7)}),
    ("Clip_attributes_opset9", "h = Clip <min = -0.5, max = 0.7> (a)", 9, {}),
    ("Erf", "h = Erf(a)", 13, {}),
    ("Gelu", "h = Gelu(a)", 20, {}),
    ("Gelu_tanh", 'h = Gelu <approximate = "tanh"> (a)', 20, {}),
    ("Exp", "h = Exp(a)", 13, {}),
    ("Cast_to_float", "c = Cast <to = 11> (a)\nh = Cast <to = 1> (c)", 13, {}),
    ("Identity", "h = Identity(a)", 13, {}),
    ("Dropout", "h = Dropout(a)", 13, {}),
    ("Dropout_with_mask", "h, mask = Dropout(a)", 13, {}),
    ("Softplus", "h = Softplus(a)", 13, {}),
    ("Elu", "h = Elu <alpha = 0.7> (a)", 13, {}),
    ("Selu", "h = Selu(a)", 13, {}),
    ("Celu", "h = Celu(a)", 13, {}),
    ("Mish", "h = Mish(a)", 18, {}),
    ("Softsign", "h = Softsign(a)", 13, {}),
    ("ThresholdedRelu", "h = ThresholdedRelu <alpha = 0.2> (a)", 13, {}),
    ("Shrink", "h = Shrink <lambd = 0.3, bias = 0.1> (a)", 13, {}),
    ("Abs_Neg", "b = Abs(a)\nh = Neg(b)", 13, {}),
    ("Sqrt_Log_Reciprocal", "b = Abs(a)\nc = Add(b, one)\nd = Sqrt(c)\ne = Log(d)\nh = Reciprocal(c)",
     13, {"one": np.float32(1.0)}),
    ("Floor_Ceil_Round_Sign", "b = Floor(a)\nc = Ceil(a)\nd = Round(a)\ne = Sign(a)\n"
     "s1 = Sum(b, c, d)\nh = Add(s1, e)", 13, {}),
    ("Sin_Cos_Tan_Atan", "b = Sin(a)\nc = Cos(a)\nd = Atan(a)\ne = Mul(c, half)\nf = Tan(e)\n"
     "h = Sum(b, f, d)", 13, {"half": np.float32(0.5)}),
]


@pytest.mark.parametrize("body, opset, consts", [pytest.param(b, o, c, id=i) for i, b, o, c in UNARY])
def test_unary_exact(tmp_path, body, opset, consts):
    check_exact_case(tmp_path, opset, body + "\n" + CONSUMER, Y4, {**consts, **W2}, W2_HALF)


K8 = (8, 1, 1)
BINARY = [
    case("Add_const", 13, "h = Add(a, K)", Y4, {"K": K8}, {"K": (4, 1, 1)}),
    case("Sub_const", 13, "h = Sub(a, K)", Y4, {"K": K8}, {"K": (4, 1, 1)}),
    case("Sub_const_first", 13, "h = Sub(K, a)", Y4, {"K": K8}, {"K": (4, 1, 1)}),
    case("Mul_const", 13, "h = Mul(a, K)", Y4, {"K": K8}, {"K": (4, 1, 1)}),
    case("Div_const", 13, "h = Div(a, K)", Y4, {"K": const(K8, 5, 0.5, 2.0)}, {"K": (4, 1, 1)}),
    case("Max_const", 13, "h = Max(a, K)", Y4, {"K": const(K8, 5)}, {"K": (4, 1, 1)}),
    case("Min_const", 13, "h = Min(a, K)", Y4, {"K": const(K8, 5)}, {"K": (4, 1, 1)}),
    case("Pow_const_exponent", 13, "h = Pow(a, E)", Y4,
         {"E": np.asarray([1, 2, 3, 2, 1, 2, 3, 1], np.float32).reshape(K8)}, {"E": (4, 1, 1)}),
    case("Pow_scalar_exponent", 13, "h = Pow(a, E)", Y4, {"E": np.float32(2.0)}, {"E": ()}),
    case("Where_const_condition", 13, "h = Where(C, a, K)", Y4,
         {"C": np.asarray([1, 0, 1, 1, 0, 0, 1, 0], bool).reshape(K8), "K": const(K8, 5)},
         {"C": (4, 1, 1), "K": (4, 1, 1)}),
    case("Greater_Where", 13, "c = Greater(a, K)\nh = Where(c, a, K2)", Y4,
         {"K": const(K8, 5), "K2": const(K8, 6)}, {"K": (4, 1, 1), "K2": (4, 1, 1)}),
    case("Less_Equal_Or_And_Xor_Not", 13,
         "c1 = Less(a, K)\nr = Relu(a)\nc2 = Equal(r, Z)\nc3 = Or(c1, c2)\nc4 = Xor(c3, c1)\n"
         "c5 = And(c3, c4)\nc6 = Not(c5)\nh = Where(c6, a, K)", Y4,
         {"K": const(K8, 5), "Z": np.float32(0.0)}, {"K": (4, 1, 1)}),
    case("GreaterOrEqual_LessOrEqual", 13,
         "c1 = GreaterOrEqual(a, K)\nc2 = LessOrEqual(a, K2)\nc = And(c1, c2)\nh = Where(c, a, K)", Y4,
         {"K": const(K8, 5), "K2": const(K8, 6)}, {"K": (4, 1, 1), "K2": (4, 1, 1)}),
    case("IsNaN_IsInf_Where", 13, "c1 = IsNaN(a)\nc2 = IsInf(a)\nc = Or(c1, c2)\nh = Where(c, K, a)", Y4,
         {"K": const(K8, 5)}, {"K": (4, 1, 1)}),
    case("BitShift_uint32", 13,
         "r = Relu(a)\nm = Mul(r, hundred)\nu = Cast <to = 12> (m)\nv = BitShift <direction = \"RIGHT\"> (u, Sh)\n"
         "h = Cast <to = 1> (v)", Y4,
         {"hundred": np.float32(100.0), "Sh": np.asarray([0, 1, 2, 3, 0, 1, 2, 3], np.uint32).reshape(K8)},
         {"Sh": (4, 1, 1)}),
    case("Mod_fmod", 13, "h = Mod <fmod = 1> (a, K)", Y4, {"K": const(K8, 5, 0.5, 2.0)}, {"K": (4, 1, 1)}),
    case("PRelu_slope", 13, "h = PRelu(a, S)", Y4, {"S": K8}, {"S": (4, 1, 1)}),
    case("Add_full_shape_const", 13, "h = Add(a, K)", Y4, {"K": (1, 8, 8, 8)}, {"K": (1, 4, 8, 8)}),
    case("Mul_broadcast_over_width", 13, "h = Mul(a, K)", Y4, {"K": (8,)}, {"K": (8,)}),
    case("Sum_variadic", 13, "b = Conv <pads = [1, 1, 1, 1]> (x, W1b)\nh = Sum(a, b, K)", Y4,
         {"W1b": (8, 3, 3, 3), "K": K8}, {"W1b": (4, 3, 3, 3), "K": (4, 1, 1)}),
    case("Mean_variadic", 13, "b = Conv <pads = [1, 1, 1, 1]> (x, W1b)\nh = Mean(a, b, K)", Y4,
         {"W1b": (8, 3, 3, 3), "K": const(K8, 5)}, {"W1b": (4, 3, 3, 3), "K": (4, 1, 1)}),
    case("Add_residual", 13,
         "r = Relu(a)\nb = Conv <pads = [1, 1, 1, 1]> (r, Wb, Bb)\nh = Add(a, b)", Y4,
         {"Wb": (8, 8, 3, 3), "Bb": (8,)}, {"Wb": (4, 4, 3, 3), "Bb": (4,)}),
]


@pytest.mark.parametrize("opset, body, out, consts, expect", BINARY)
def test_broadcast_exact(tmp_path, opset, body, out, consts, expect):
    _, result, _ = check_exact_case(tmp_path, opset, body + "\n" + CONSUMER, out, {**consts, **W2},
                            {**W2_HALF, **expect})
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 8)


def test_residual_is_one_group(tmp_path):
    """Both convs feeding a residual Add share one group: the same channels leave both."""
    body = "r = Relu(a)\nb = Conv <pads = [1, 1, 1, 1]> (r, Wb, Bb)\nh = Add(a, b)\n" + CONSUMER
    graph = build(tmp_path, chain(body, Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "Wb": (8, 8, 3, 3), "Bb": (8,), **W2})
    result, _ = prune_exact(graph)
    analysis = result.analysis
    group = group_of(analysis, "W1", 0)
    assert group is group_of(analysis, "Wb", 0) is group_of(analysis, "Wb", 1)
    np.testing.assert_array_equal(removed(result, "W1", 0), removed(result, "Wb", 0))
    np.testing.assert_array_equal(removed(result, "W1", 0), removed(result, "Wb", 1))


def test_squeeze_excitation(tmp_path):
    """GlobalAveragePool -> Conv(8->2) -> Relu -> Conv(2->8) -> Sigmoid -> Mul: the gate's
    channels are the block's channels; the squeeze width is its own group."""
    body = """
        p = GlobalAveragePool(a)
        s1 = Conv (p, Ws1, Bs1)
        s2 = Relu(s1)
        s3 = Conv (s2, Ws2, Bs2)
        s4 = Sigmoid(s3)
        h = Mul(a, s4)
    """ + CONSUMER
    consts = {"W1": (8, 3, 3, 3), "B1": (8,), "Ws1": (2, 8, 1, 1), "Bs1": (2,),
              "Ws2": (8, 2, 1, 1), "Bs2": (8,), **W2}
    graph = build(tmp_path, chain(body, Y4), 13, consts)
    result, pruned = prune_exact(graph)
    analysis = result.analysis
    assert group_of(analysis, "W1", 0) is group_of(analysis, "Ws2", 0)
    assert (len(group_of(analysis, "Ws1", 0).units), len(group_of(analysis, "Ws1", 0).prunable)) == (2, 2)
    np.testing.assert_array_equal(removed(result, "W1", 0), removed(result, "Ws2", 0))
    assert shapes_of(pruned, ["W1", "Ws1", "Bs1", "Ws2", "Bs2", "W2"]) == {
        "W1": (4, 3, 3, 3), "Ws1": (1, 4, 1, 1), "Bs1": (1,), "Ws2": (4, 1, 1, 1), "Bs2": (4,),
        "W2": (4, 4, 1, 1)}


# -- layout ops ----------------------------------------------------------------------------------

def test_concat(tmp_path):
    """Two convs (8 and 4 filters) concatenated on the channel axis share the concat output, so
    they form one group of 12 units of which 6 leave; the consumer loses the columns of both
    producers at their offsets."""
    body = "b = Conv <pads = [1, 1, 1, 1]> (x, W1b, B1b)\nh = Concat <axis = 1> (a, b)\ny = Conv (h, W2)"
    graph = build(tmp_path, chain(body, Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "W1b": (4, 3, 3, 3), "B1b": (4,), "W2": (4, 12, 1, 1)})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert group is group_of(result.analysis, "W1b", 0)
    assert (len(group.units), len(group.prunable)) == (12, 12)
    gone_a, gone_b = removed(result, "W1", 0), removed(result, "W1b", 0)
    assert len(gone_a) + len(gone_b) == 6
    np.testing.assert_array_equal(removed(result, "W2", 1), np.concatenate([gone_a, 8 + gone_b]))
    assert shapes_of(pruned, ["W1", "W1b", "B1b", "W2"]) == {
        "W1": (8 - len(gone_a), 3, 3, 3), "W1b": (4 - len(gone_b), 3, 3, 3), "B1b": (4 - len(gone_b),),
        "W2": (4, 6, 1, 1)}


def test_concat_same_tensor_twice(tmp_path):
    """Concat(a, a): channel c of a is output channels c and 8 + c."""
    graph = build(tmp_path, chain("h = Concat <axis = 1> (a, a)\ny = Conv (h, W2)", Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 16, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    np.testing.assert_array_equal(removed(result, "W2", 1), np.concatenate([gone, gone + 8]))
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 8, 1, 1)}


def test_concat_and_split_on_spatial_axis(tmp_path):
    """Concat and Split on H: the channel axis is identity for every input and output, so both
    producers and both consumers lose the same channels."""
    body = """
        b = Conv <pads = [1, 1, 1, 1]> (x, W1b)
        h = Concat <axis = 2> (a, b)
        h1, h2 = Split <axis = 2> (h, S)
        y1 = Conv (h1, Wa)
        y2 = Conv (h2, Wb)
    """
    graph = build(tmp_path, chain(body, "float[1,4,10,8] y1, float[1,4,6,8] y2"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "W1b": (8, 3, 3, 3), "S": i64(10, 6), "Wa": (4, 8, 1, 1),
                   "Wb": (4, 8, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    for tensor, axis in (("W1b", 0), ("Wa", 1), ("Wb", 1)):
        np.testing.assert_array_equal(removed(result, tensor, axis), gone)
    assert list(input_value(pruned, nodes(pruned, "Split")[0], 1)) == [10, 6]
    assert shapes_of(pruned, ["W1", "W1b", "Wa", "Wb"]) == {
        "W1": (4, 3, 3, 3), "W1b": (4, 3, 3, 3), "Wa": (4, 4, 1, 1), "Wb": (4, 4, 1, 1)}


SPLIT_FORMS = [
    pytest.param(11, "h1, h2 = Split <axis = 1, split = [5, 3]> (a)", {}, (5, 3), id="attribute_opset11"),
    pytest.param(13, "h1, h2 = Split <axis = 1> (a, S)", {"S": i64(5, 3)}, (5, 3), id="input_opset13"),
    pytest.param(18, "h1, h2 = Split <axis = 1, num_outputs = 2> (a)", {}, (4, 4), id="num_outputs_opset18"),
]


@pytest.mark.parametrize("opset, split, consts, sizes", SPLIT_FORMS)
def test_split(tmp_path, opset, split, consts, sizes):
    """8 channels split [5, 3] (or into two equal outputs), each part read by its own conv;
    channels 0, 1, 2 and 5 are made the weakest, so the parts lose unequal numbers and the
    sizes must be rewritten."""
    body = f"{split}\ny1 = Conv (h1, Wa)\ny2 = Conv (h2, Wb)"
    text = chain(body, "float[1,4,8,8] y1, float[1,4,8,8] y2")
    graph = build(tmp_path, text, opset,
                  {"W1": (8, 3, 3, 3), "B1": (8,), **consts, "Wa": (4, sizes[0], 1, 1), "Wb": (4, sizes[1], 1, 1)})
    weak = [0, 1, 2, 5]
    weaken(graph, {("W1", 0): weak, ("B1", 0): weak, ("Wa", 1): [c for c in weak if c < sizes[0]],
                   ("Wb", 1): [c - sizes[0] for c in weak if c >= sizes[0]]})
    result, pruned = prune_exact(graph)
    np.testing.assert_array_equal(removed(result, "W1", 0), weak)
    new = [sizes[0] - sum(c < sizes[0] for c in weak), sizes[1] - sum(c >= sizes[0] for c in weak)]
    assert shapes_of(pruned, ["Wa", "Wb"]) == {"Wa": (4, new[0], 1, 1), "Wb": (4, new[1], 1, 1)}
    node = nodes(pruned, "Split")[0]
    if opset < 13:
        assert attr(node, "split") == new
    else:
        assert attr(node, "num_outputs") is None
        assert list(input_value(pruned, node, 1)) == new


SLICE_FORMS = [
    # (opset, body, constants, start, end, the end kept as it was (None: rewritten))
    pytest.param(9, "h = Slice <starts = [-7], ends = [-1], axes = [1]> (a)", {}, 1, 7, None, id="attributes_opset9"),
    pytest.param(13, "h = Slice (a, St, En, Ax)", {"St": i64(-6), "En": i64(INT64_MAX), "Ax": i64(1)},
                 2, 8, INT64_MAX, id="inputs_opset13_int64_max"),
    pytest.param(13, "h = Slice (a, St, En, Ax, Sp)",
                 {"St": i64(0, 1), "En": i64(8, 6), "Ax": i64(2, -3), "Sp": i64(1, 1)}, 1, 6, None,
                 id="inputs_opset13_two_axes_with_steps"),
    pytest.param(13, "h = Slice (a, St, En, Ax, Sp)",  # as a TensorFlow export writes a full slice
                 {"St": i32(0, 2), "En": i32(10**9, 10**9), "Ax": i32(2, 1), "Sp": i32(1, 1)}, 2, 8, 10**9,
                 id="int32_inputs_opset13"),
    pytest.param(13, f"""St = Constant <value = int64[1] {{-6}}> ()
        En = Constant <value = int64[1] {{{INT64_MAX}}}> ()
        Ax = Constant <value = int64[1] {{1}}> ()
        h = Slice (a, St, En, Ax)""", {}, 2, 8, INT64_MAX, id="constant_nodes_opset13"),
]


@pytest.mark.parametrize("opset, body, consts, start, end, kept_end", SLICE_FORMS)
def test_slice_channels(tmp_path, opset, body, consts, start, end, kept_end):
    """Channels start..end-1 are read; the others may leave freely; bounds are rewritten, in the
    integer type they had."""
    width = end - start
    graph = build(tmp_path, chain(body + "\ny = Conv (h, W2)", Y4), opset,
                  {"W1": (8, 3, 3, 3), "B1": (8,), **consts, "W2": (4, width, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4
    inside = gone[(gone >= start) & (gone < end)]
    np.testing.assert_array_equal(removed(result, "W2", 1), inside - start)
    new_start = start - int(np.sum(gone < start))
    new_width = width - len(inside)
    node = nodes(pruned, "Slice")[0]
    if opset < 10:
        starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")
    else:
        starts, ends = list(input_value(pruned, node, 1)), list(input_value(pruned, node, 2))
        axes = [a % 4 for a in input_value(pruned, node, 3)]
        assert {input_value(pruned, node, k).dtype for k in range(1, len(node.input))} == {
            np.asarray(consts.get("St", i64(0))).dtype}
    k = list(axes).index(1)
    assert starts[k] == new_start
    assert ends[k] == (new_start + new_width if kept_end is None else kept_end)
    assert shapes_of(pruned, ["W2"]) == {"W2": (4, new_width, 1, 1)}


def test_gather_channels(tmp_path):
    """Gather indices [0, 2, 3, 3, 5, 7] on the channel axis: 1, 4, 6 are never read, 3 twice."""
    picked = i64(0, 2, 3, 3, 5, 7)
    graph = build(tmp_path, chain("h = Gather <axis = 1> (a, I)\ny = Conv (h, W2)", Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "I": picked, "W2": (4, 6, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4
    kept = np.setdiff1d(np.arange(8), gone)
    expected = [int(np.searchsorted(kept, p)) for p in picked if p in kept]
    node = nodes(pruned, "Gather")[0]
    assert list(input_value(pruned, node, 1)) == expected
    positions_gone = [k for k, p in enumerate(picked) if p in gone]
    np.testing.assert_array_equal(removed(result, "W2", 1), positions_gone)
    assert shapes_of(pruned, ["W2"]) == {"W2": (4, len(expected), 1, 1)}


def test_gather_negative_indices(tmp_path):
    picked = i64(-1, 0, -3, 2)
    graph = build(tmp_path, chain("h = Gather <axis = 1> (a, I)\ny = Conv (h, W2)", Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "I": picked, "W2": (4, 4, 1, 1)})
    result, pruned = prune_exact(graph)
    kept = np.setdiff1d(np.arange(8), removed(result, "W1", 0))
    expected = [int(np.searchsorted(kept, p % 8)) for p in picked if p % 8 in kept]
    assert list(input_value(pruned, nodes(pruned, "Gather")[0], 1)) == expected


def test_gather_elements_keeps_channels_on_other_axes(tmp_path):
    """GatherElements along the width (DeBERTa's relative positions): the channel axis of the
    data, the indices and the output are one, so channels leave the constant indices too, whose
    values stay."""
    indices = np.random.default_rng(0).integers(0, 8, size=(1, 8, 8, 5)).astype(np.int64)
    graph = build(tmp_path, chain("h = GatherElements <axis = 3> (a, I)\ny = Conv (h, W2)", "float[1,4,8,5] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "I": indices, "W2": (4, 8, 1, 1)})
    _assert_half_leave_with_the_indices(graph, ("W2", 1), "GatherElements", indices)


def _assert_half_leave_with_the_indices(graph: Graph, partner: tuple[str, int], op: str, indices: np.ndarray) -> None:
    """Pruned exactly, four of W1's eight channels leave, with the same positions of ``partner``
    (a tensor and axis) and of the constant indices of the ``op`` node, whose values stay."""
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4
    np.testing.assert_array_equal(removed(result, *partner), gone)
    np.testing.assert_array_equal(input_value(pruned, nodes(pruned, op)[0], 1), np.delete(indices, gone, axis=1))


def test_gather_elements_along_channels_blocks_them(tmp_path):
    """Gathered along the channels, the data's channel positions are whatever the indices say."""
    indices = np.random.default_rng(0).integers(0, 8, size=(1, 8, 8, 8)).astype(np.int64)
    graph = build(tmp_path, chain("h = GatherElements <axis = 1> (a, I)\ny = Conv (h, W2)", Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "I": indices, "W2": (4, 8, 1, 1)})
    analysis = analyze_graph(graph)
    assert not group_of(analysis, "W1", 0).prunable
    assert "GatherElements" in " ".join(group_of(analysis, "W1", 0).blocked_reasons)


def _distinct_rows(shape: tuple[int, ...], axis: int, size: int, seed: int = 0) -> np.ndarray:
    """Int64 indices of ``shape`` in ``[0, size)``, distinct along ``axis`` (a scatter without a
    reduction is defined only when no two updates land on one element)."""
    rng = np.random.default_rng(seed)
    moved = list(shape)
    count = moved.pop(axis)
    rows = [rng.permutation(size)[:count] for _ in range(int(np.prod(moved)))]
    return np.moveaxis(np.asarray(rows, dtype=np.int64).reshape(*moved, count), -1, axis)


SCATTER_SOURCES = "b = Conv <pads = [1, 1, 1, 1]> (x, W3, B3)"
SCATTER_CONSTS = {"W1": (8, 3, 3, 3), "B1": (8,), "W3": (8, 3, 3, 3), "B3": (8,)}


def test_scatter_elements_keeps_channels_on_other_axes(tmp_path):
    """Rows of one conv's output scattered into another's along the height: the channel axis of
    the data, the indices, the updates and the output is one, so both convs lose the same
    channels and the constant indices lose them too, their values unchanged."""
    indices = _distinct_rows((1, 8, 3, 8), 2, 8)
    body = f"""{SCATTER_SOURCES}
        u = Slice (b, S0, S1, S2)
        h = ScatterElements <axis = 2> (a, I, u)
        y = Conv (h, W2)"""
    graph = build(tmp_path, chain(body, Y4), 13, {**SCATTER_CONSTS, "S0": i64(2), "S1": i64(5), "S2": i64(2),
                                                  "I": indices, "W2": (4, 8, 1, 1)})
    _assert_half_leave_with_the_indices(graph, ("W3", 0), "ScatterElements", indices)


@pytest.mark.parametrize("opset, reduction", [(13, ""), (16, " <reduction = \"add\">")])
def test_scatter_nd_keeps_the_axes_past_the_addressed_ones(tmp_path, opset, reduction):
    """Two rows (batch, height) of one conv's channels-last output written over another's, as an
    exported ``x[:, t] = ...`` writes one step of every channel, with and without a reduction:
    the channels of the data, the updates and the output are one axis; the indices stay."""
    indices = i64(0, 3, 0, 5).reshape(2, 1, 2)  # q = 3, addressing m = 2 axes; updates [2, 1, 8, 8]
    body = f"""{SCATTER_SOURCES}
        t = Transpose <perm = [0, 2, 3, 1]> (a)
        s = Transpose <perm = [2, 0, 3, 1]> (b)
        u = Slice (s, S0, S1, S2)
        n = ScatterND{reduction} (t, I, u)
        h = Transpose <perm = [0, 3, 1, 2]> (n)
        y = Conv (h, W2)"""
    graph = build(tmp_path, chain(body, Y4), opset, {**SCATTER_CONSTS, "S0": i64(2), "S1": i64(4), "S2": i64(0),
                                                     "I": indices, "W2": (4, 8, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    assert len(gone) == 4
    np.testing.assert_array_equal(removed(result, "W3", 0), gone)
    np.testing.assert_array_equal(input_value(pruned, nodes(pruned, "ScatterND")[0], 1), indices)


def test_scatters_into_one_initializer_of_zeros_prune_apart(tmp_path):
    """Two convs' outputs scattered into one initializer of zeros (RWKV's dynamo export keeps
    every recurrent state of every layer in one): each scatter gets its own copy on loading, so
    channel k of one conv no longer leaves with channel k of the other (16 units, not 8); exact."""
    body = f"""{SCATTER_SOURCES}
        p = ScatterElements <axis = 3> (Z, I, a)
        q = ScatterElements <axis = 3> (Z, J, b)
        h = Concat <axis = 1> (p, q)
        y = Conv (h, W2)"""
    graph = build(tmp_path, chain(body, "float[1,4,8,16] y"), 13, {
        **SCATTER_CONSTS, "Z": np.zeros((1, 8, 8, 16), np.float32), "I": _distinct_rows((1, 8, 8, 8), 3, 16),
        "J": _distinct_rows((1, 8, 8, 8), 3, 16, seed=1), "W2": (4, 16, 1, 1)})
    assert sorted(n.inputs[0] for n in graph.nodes if n.op_type == "ScatterElements") == ["Z", "Z.1"]
    assert len(group_of(analyze_graph(graph), "W1", 0).units) == 16
    result, pruned = prune_exact(graph)
    kept = [8 - len(removed(result, weight, 0)) for weight in ("W1", "W3")]
    assert sum(kept) == 8
    assert [initializer(pruned, name).shape for name in ("Z", "Z.1")] == [(1, k, 8, 16) for k in kept]


@pytest.mark.parametrize("scatter", ["ScatterElements <axis = 1> (a, I, u)", "ScatterND (a, J, v)"])
def test_scatter_onto_addressed_channels_blocks_them(tmp_path, scatter):
    """Scattered along the channels (or with every axis addressed), which output channel an
    update lands on is whatever the indices say: the data's channels may not go, nor the three
    of the other conv's that the updates carry (the five it does not read may)."""
    body = f"""{SCATTER_SOURCES}
        u = Slice (b, S0, S1, S2)
        v = Reshape (u, R)
        h = {scatter}
        y = Conv (h, W2)"""
    graph = build(tmp_path, chain(body, Y4), 13, {
        **SCATTER_CONSTS, "S0": i64(0), "S1": i64(3), "S2": i64(1), "R": i64(3, 64),
        "I": _distinct_rows((1, 3, 8, 8), 1, 8), "J": np.stack(np.meshgrid(
            [0], [1, 4, 6], np.arange(8), np.arange(8), indexing="ij"), axis=-1).reshape(3, 64, 4).astype(np.int64),
        "W2": (4, 8, 1, 1)})
    analysis = analyze_graph(graph)
    assert not group_of(analysis, "W1", 0).prunable
    assert group_of(analysis, "W3", 0).prunable == [3, 4, 5, 6, 7]
    assert "Scatter" in " ".join(group_of(analysis, "W1", 0).blocked_reasons)


def test_transpose_then_matmul(tmp_path):
    """NCHW -> NHWC, then MatMul with a weight [C, K]: the weight's rows go with the channels."""
    body = "t = Transpose <perm = [0, 2, 3, 1]> (a)\ny = MatMul (t, Wm)"
    graph = build(tmp_path, chain(body, "float[1,8,8,5] y"), 13, {"W1": (8, 3, 3, 3), "B1": (8,), "Wm": (8, 5)})
    result, pruned = prune_exact(graph)
    np.testing.assert_array_equal(removed(result, "Wm", 0), removed(result, "W1", 0))
    assert shapes_of(pruned, ["W1", "Wm"]) == {"W1": (4, 3, 3, 3), "Wm": (4, 5)}


FLATTEN_GEMM = [
    # (body, constants, shapes after, features per channel, K axis of G)
    pytest.param("f = Flatten <axis = 1> (a)\ny = Gemm (f, G)", {"G": (512, 10)}, {"G": (256, 10)}, 64, 0,
                 id="Flatten_Gemm"),
    pytest.param("f = Reshape (a, T)\ny = Gemm <transB = 1> (f, G, Gc)",
                 {"T": i64(1, -1), "G": (10, 512), "Gc": (10,)}, {"G": (10, 256), "Gc": (10,)}, 64, 1,
                 id="Reshape_minus1_Gemm_transB"),
    pytest.param("f = Reshape (a, T)\ny = Gemm (f, G)",
                 {"T": i64(1, 512), "G": (512, 10)}, {"G": (256, 10)}, 64, 0, id="Reshape_explicit_Gemm"),
    pytest.param("p = GlobalAveragePool(a)\nf = Flatten(p)\ny = Gemm <transB = 1> (f, G, Gc)",
                 {"G": (10, 8), "Gc": (10,)}, {"G": (10, 4), "Gc": (10,)}, 1, 1, id="GAP_Flatten_Gemm_transB"),
    pytest.param("p = GlobalAveragePool(a)\nf = Flatten(p)\nfT = Transpose(f)\ny = Gemm <transA = 1> (fT, G)",
                 {"G": (8, 10)}, {"G": (4, 10)}, 1, 0, id="GAP_Flatten_Transpose_Gemm_transA"),
]


@pytest.mark.parametrize("body, consts, expect, per_channel, k_axis", FLATTEN_GEMM)
def test_flatten_reshape_gemm(tmp_path, body, consts, expect, per_channel, k_axis):
    """A merge: channel c owns the feature slab c*HW..(c+1)*HW-1 of the Gemm input."""
    graph = build(tmp_path, chain(body, "float[1,10] y"), 13, {"W1": (8, 3, 3, 3), "B1": (8,), **consts})
    result, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", *expect]) == {"W1": (4, 3, 3, 3), **expect}
    gone = removed(result, "W1", 0)
    np.testing.assert_array_equal(removed(result, "G", k_axis),
                                  (gone[:, None] * per_channel + np.arange(per_channel)).ravel())


PERMUTED_FLATTEN = [
    # (body, constants, shapes after, merged size after the channel axis, K axis of G): the
    # conv's channels moved inside the merge by a Transpose
    pytest.param("t = Transpose <perm = [0, 2, 3, 1]> (a)\nf = Flatten (t)\ny = Gemm (f, G)",
                 {"G": (512, 10)}, {"G": (256, 10)}, 1, 0, id="NHWC_Flatten_Gemm"),
    pytest.param("r = Relu (a)\nt = Transpose <perm = [0, 2, 1, 3]> (r)\nf = Reshape (t, T)\ny = Gemm <transB = 1> (f, G)",
                 {"T": i64(1, -1), "G": (10, 512)}, {"G": (10, 256)}, 8, 1, id="Relu_HCW_Reshape_Gemm_transB"),
    # TensorFlow's BatchNorm written as Mul and Add after the Transpose to NHWC
    pytest.param("t = Transpose <perm = [0, 2, 3, 1]> (a)\nm = Mul (t, S)\nb = Add (m, Sb)\nf = Flatten (b)\ny = Gemm (f, G)",
                 {"S": (8,), "Sb": (8,), "G": (512, 10)}, {"G": (256, 10)}, 1, 0, id="NHWC_Mul_Add_Flatten_Gemm"),
]


@pytest.mark.parametrize("body, consts, expect, inner, k_axis", PERMUTED_FLATTEN)
def test_flatten_after_a_permute_keeps_the_channels(tmp_path, body, consts, expect, inner, k_axis):
    """A permute before the flatten (Keras' channels-last Flatten, CREPE's ``permute(0, 2, 1,
    3).reshape(N, -1)``) leaves the channels inside the merge: channel c is feature ``f`` with
    ``(f // inner) % 8 == c``, ``inner`` the product of the merged sizes after the channel axis
    (1 for NHWC, 8 for ``[H, C, W]``)."""
    graph = build(tmp_path, chain(body, "float[1,10] y"), 13, {"W1": (8, 3, 3, 3), "B1": (8,), **consts})
    result, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", *expect]) == {"W1": (4, 3, 3, 3), **expect}
    features = np.arange(512)
    np.testing.assert_array_equal(removed(result, "G", k_axis),
                                  features[np.isin((features // inner) % 8, removed(result, "W1", 0))])


def test_flatten_of_embedding_rows_beside_features_keeps_their_last_axis(tmp_path):
    """Keras' Flatten of ``[tokens, features]`` where the features are an embedding's rows joined
    with a convolution's channels (deepcut): the last axis holds the channels, so feature ``f``
    of the 1024 is position ``f % 16`` of the 16 (6 embedding dimensions, the convolution's 8, 2
    more), and the convolution's channels prune (the embedding tables' columns are hidden
    dimensions, left whole)."""
    body = """
        t = Transpose <perm = [0, 2, 3, 1]> (a)
        r = Reshape (t, R)
        e = Gather (E, ids)
        e2 = Gather (E2, ids)
        c = Concat <axis = 2> (e, r, e2)
        f = Flatten (c)
        y = Gemm (f, G)
    """
    graph = build(tmp_path, chain(body, "float[1,10] y", f"{X}, int64[1,64] ids"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "R": i64(1, 64, 8), "E": (10, 6), "E2": (10, 2), "G": (1024, 10)})
    result, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", "E", "E2", "G"]) == {"W1": (4, 3, 3, 3), "E": (10, 6), "E2": (10, 2), "G": (768, 10)}
    features = np.arange(1024)
    np.testing.assert_array_equal(removed(result, "G", 0), features[np.isin(features % 16, 6 + removed(result, "W1", 0))])


def test_flatten_of_a_matmul_output_permuted_keeps_its_last_axis(tmp_path):
    """MatMul writes channels on its last axis: ``[1, 8, 6] -> [1, 6, 8]`` then flattened to 48
    couples the 6 channels, features ``c*8 .. c*8 + 7``, as without the permute (the rows,
    the convolution's channels, are then inside the merge: a barrier)."""
    body = """
        s = Reshape (a, S)
        m = MatMul (s, Wm)
        t = Transpose <perm = [0, 2, 1]> (m)
        f = Reshape (t, T)
        y = Gemm (f, G)
    """
    graph = build(tmp_path, chain(body, "float[1,10] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "S": i64(1, 8, 64), "Wm": (64, 6), "T": i64(1, 48), "G": (48, 10)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "Wm", 1)
    assert len(gone) == 3 and initializer(pruned, "G").shape == (24, 10)
    assert not group_of(result.analysis, "W1", 0).prunable
    np.testing.assert_array_equal(removed(result, "G", 0), (gone[:, None] * 8 + np.arange(8)).ravel())


def test_channels_last_split_before_a_convolution_keeps_the_channels(tmp_path):
    """Keras' ``Dense -> Reshape((4, 4, 8)) -> Conv2D`` exported to NCHW: the dense layer's
    feature ``f`` is channel ``f % 8`` of the convolution that reads it, so its 128 features
    leave 16 at a time (every 8th) with that convolution's input channels."""
    body = """
        f = Flatten (a)
        d = Gemm (f, G)
        r = Reshape (d, R)
        t = Transpose <perm = [0, 3, 1, 2]> (r)
        y = Conv (t, W2)
    """
    graph = build(tmp_path, chain(body, "float[1,5,2,2] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "G": (512, 128), "R": i64(1, 4, 4, 8), "W2": (5, 8, 3, 3)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W2", 1)
    assert len(gone) == 4 and shapes_of(pruned, ["G", "W2"]) == {"G": (256, 64), "W2": (5, 4, 3, 3)}
    features = np.arange(128)
    np.testing.assert_array_equal(removed(result, "G", 1), features[np.isin(features % 8, gone)])


def test_flatten_with_shape_computed_target(tmp_path):
    """``x.view(x.size(0), -1)`` as PyTorch exports it: Shape -> Gather -> Unsqueeze -> Concat
    gives the Reshape target. At the bound input shape the target is a constant [1, -1]."""
    body = """
        s = Shape (a)
        n = Gather <axis = 0> (s, Zero)
        nu = Unsqueeze (n, Ax0)
        t = Concat <axis = 0> (nu, M1)
        f = Reshape (a, t)
        y = Gemm (f, G)
    """
    graph = build(tmp_path, chain(body, "float[1,10] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "Zero": np.int64(0), "Ax0": i64(0), "M1": i64(-1), "G": (512, 10)})
    _, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", "G"]) == {"W1": (4, 3, 3, 3), "G": (256, 10)}


def test_gemm_chain(tmp_path):
    """Gemm as producer (transB=1, bias C) then Gemm consumer (transB=0): N of the first is a
    root, its rows of B, C and the second's K rows leave together."""
    body = """
        p = GlobalAveragePool(a)
        f = Flatten(p)
        g1 = Gemm <transB = 1> (f, G1, C1)
        r = Relu(g1)
        y = Gemm (r, G2, C2)
    """
    graph = build(tmp_path, chain(body, "float[1,10] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "G1": (16, 8), "C1": (16,), "G2": (16, 10), "C2": (10,)})
    result, pruned = prune_exact(graph)
    np.testing.assert_array_equal(removed(result, "G1", 0), removed(result, "G2", 0))
    assert shapes_of(pruned, ["W1", "G1", "C1", "G2", "C2"]) == {
        "W1": (4, 3, 3, 3), "G1": (8, 4), "C1": (8,), "G2": (8, 10), "C2": (10,)}


def test_matmul_rank3(tmp_path):
    """[N, L, C] @ [C, K] (+ bias) -> Relu -> @ [K, J]: K is a prunable hidden width."""
    text = """g (float[2,5,6] x) => (float[2,5,4] y) {
        m = MatMul (x, Wa)
        b = Add (m, Ba)
        r = Relu (b)
        y = MatMul (r, Wb)
    }"""
    graph = build(tmp_path, text, 13, {"Wa": (6, 8), "Ba": (8,), "Wb": (8, 4)})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "Wa", 1)
    assert (len(group.units), len(group.prunable)) == (8, 8)
    assert group_of(result.analysis, "x", 2) is None
    assert shapes_of(pruned, ["Wa", "Ba", "Wb"]) == {"Wa": (6, 4), "Ba": (4,), "Wb": (4, 4)}


CONSTANT_READERS = [
    # (graph, constants, the constant reading the pruned channels, its channel axis, shape after)
    pytest.param("""g (float[2,5,6] x) => (float[2,5] y) {
        m = MatMul (x, Wa)
        r = Relu (m)
        y = MatMul (r, V)
    }""", {"Wa": (6, 8), "V": (8,)}, "V", 0, (4,), id="MatMul_vector_weight"),
    pytest.param(chain("r = Reshape (a, T)\ny = MatMul (Wc, r)", "float[1,5,64] y"),
                 {"W1": (8, 3, 3, 3), "B1": (8,), "T": i64(1, 8, 64), "Wc": (5, 8)}, "Wc", 1, (5, 4),
                 id="MatMul_constant_A"),
    pytest.param(chain("p = GlobalAveragePool (a)\nf = Flatten (p)\nt = Transpose (f)\ny = Gemm (Wc, t)",
                       "float[5,1] y"),
                 {"W1": (8, 3, 3, 3), "B1": (8,), "Wc": (5, 8)}, "Wc", 1, (5, 4), id="Gemm_constant_A"),
]


@pytest.mark.parametrize("text, consts, reader, axis, after", CONSTANT_READERS)
def test_constant_operand_reading_channels(tmp_path, text, consts, reader, axis, after):
    """A constant operand other than B[K, N] can read the pruned channels: a 1-D MatMul weight
    (matrix-vector product) or a constant A. Its K slab is a consumer weight (zeroed by the
    exactness check, counted by the magnitude criteria), and it is sliced with the channels."""
    graph = build(tmp_path, text, 13, consts)
    result, pruned = prune_exact(graph)
    assert result.analysis.axis_id(reader, axis) in result.analysis.tags.get("consumer", [])
    assert shapes_of(pruned, [reader]) == {reader: after}


@pytest.mark.parametrize("product", [
    pytest.param("d = MatMul (a, V)", id="vector_right"),
    pytest.param("d = MatMul (V, a)", id="vector_left"),
])
def test_matmul_with_a_vector_keeps_the_batch_axes(tmp_path, product):
    """A 1-D operand adds no row (or column) axis to the product: [2, 2, 6, 6] with a vector of 6
    gives [2, 2, 6], whose axis 1 holds the channels and axis 0 the batch, although both are 2."""
    text = f"""g (float[2,3,6,6] x) => (float[2,4,6,1] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
        {product}
        u = Unsqueeze (d, Ax)
        y = Conv (u, W2)
    }}"""
    graph = build(tmp_path, text, 13, {"W1": (2, 3, 3, 3), "B1": (2,), "V": (6,), "Ax": i64(3), "W2": (4, 2, 1, 1)})
    result, pruned = prune_exact(graph)
    channels = group_of(result.analysis, "W1", 0)
    assert result.analysis.axis_id("d", 1) in channels.axes
    assert result.analysis.axis_id("d", 0) not in channels.axes
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (1, 3, 3, 3), "W2": (4, 1, 1, 1)}


@pytest.mark.parametrize("opset, squeeze, unsqueeze, consts", [
    pytest.param(11, "s = Squeeze <axes = [2, 3]> (p)", "u = Unsqueeze <axes = [2, 3]> (s)", {},
                 id="attributes_opset11"),
    pytest.param(13, "s = Squeeze (p, Ax)", "u = Unsqueeze (s, Ax)", {"Ax": i64(2, 3)}, id="inputs_opset13"),
    pytest.param(13, "s = Squeeze (p)", "u = Unsqueeze (s, Ax)", {"Ax": i64(0, -1, -2)},
                 id="no_axes_and_negative_axes_opset13"),
])
def test_squeeze_unsqueeze(tmp_path, opset, squeeze, unsqueeze, consts):
    body = f"p = GlobalAveragePool(a)\n{squeeze}\n{unsqueeze}\ny = Conv (u, W2)"
    graph = build(tmp_path, chain(body, "float[1,4,1,1] y"), opset, {"W1": (8, 3, 3, 3), "B1": (8,), **consts, **W2})
    _, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}


def test_reshape_side_by_side_positions(tmp_path):
    """``[1, 8, 6] -> [1, 4, 12]``: two consecutive positions' 6 channels side by side (a model
    reading a sequence two tokens at a time). Channel c is feature c and 6 + c of the merged
    axis; both leave with it, and the target's 12 becomes twice the kept channels."""
    text = """g (float[1,8,4] x) => (float[1,4,5] y) {
        m = MatMul (x, Wa)
        r = Relu (m)
        h = Reshape (r, T)
        y = MatMul (h, Wb)
    }"""
    graph = build(tmp_path, text, 13, {"Wa": (4, 6), "T": i64(1, 4, 12), "Wb": (12, 5)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "Wa", 1)
    assert len(gone) == 3
    np.testing.assert_array_equal(removed(result, "Wb", 0), np.sort(np.concatenate([gone, gone + 6])))
    assert shapes_of(pruned, ["Wa", "Wb"]) == {"Wa": (4, 3), "Wb": (6, 5)}
    assert list(input_value(pruned, nodes(pruned, "Reshape")[0], 1)) == [1, 4, 6]


def test_channel_shuffle(tmp_path):
    """Reshape [1,2,4,8,8] -> Transpose [0,2,1,3,4] -> Reshape [1,8,8,8]: channel t leaves with
    t+4 (same position in both groups); the reshape targets follow."""
    body = """
        r1 = Reshape (a, T1)
        t = Transpose <perm = [0, 2, 1, 3, 4]> (r1)
        h = Reshape (t, T2)
        y = Conv (h, W2)
    """
    graph = build(tmp_path, chain(body, Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "T1": i64(1, 2, 4, 8, 8), "T2": i64(1, -1, 8, 8), **W2})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (4, 4)
    gone = removed(result, "W1", 0)
    positions = gone[gone < 4]
    np.testing.assert_array_equal(gone, np.concatenate([positions, positions + 4]))
    np.testing.assert_array_equal(removed(result, "W2", 1), np.sort(np.concatenate([2 * positions, 2 * positions + 1])))
    reshapes = nodes(pruned, "Reshape")
    assert list(input_value(pruned, reshapes[0], 1)) == [1, 2, 2, 8, 8]
    assert list(input_value(pruned, reshapes[1], 1)) == [1, -1, 8, 8]
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}


@pytest.mark.parametrize("opset, squeeze, unsqueeze, consts", [
    pytest.param(11, "s = Squeeze (p)", "u = Unsqueeze <axes = [0]> (s)", {}, id="opset11"),
    pytest.param(13, "s = Squeeze (p)", "u = Unsqueeze (s, Ax)", {"Ax": i64(0)}, id="opset13"),
])
def test_squeeze_without_axes_down_to_one_channel(tmp_path, opset, squeeze, unsqueeze, consts):
    """Squeeze without axes removes every size-1 axis *of the tensor it is given*: when pruning
    leaves one channel, the pruned model must not squeeze the channel axis too."""
    body = f"p = GlobalAveragePool(a)\n{squeeze}\n{unsqueeze}\ny = Gemm (u, G)"
    graph = build(tmp_path, chain(body, "float[1,4] y"), opset,
                  {"W1": (2, 3, 3, 3), "B1": (2,), **consts, "G": (2, 4)})
    _, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", "G"]) == {"W1": (1, 3, 3, 3), "G": (1, 4)}


EXPAND_TILE = [
    case("Expand_full_shape", 13, "p = GlobalAveragePool(a)\nh = Expand(p, S)", Y4, {"S": i64(1, 8, 8, 8)}, {}),
    case("Expand_channel_1", 13, "p = GlobalAveragePool(a)\nh = Expand(p, S)", Y4, {"S": i64(1, 1, 8, 8)}, {}),
    case("Expand_batch", 13, "h = Expand(a, S)", "float[2,4,8,8] y", {"S": i64(2, 1, 1, 1)}, {}),
    case("Tile_spatial", 13, "p = GlobalAveragePool(a)\nh = Tile(p, R)", Y4, {"R": i64(1, 1, 8, 8)}, {}),
]


@pytest.mark.parametrize("opset, body, out, consts, expect", EXPAND_TILE)
def test_expand_tile(tmp_path, opset, body, out, consts, expect):
    check_exact_case(tmp_path, opset, body + "\n" + CONSUMER, out, {**consts, **W2}, W2_HALF)


# -- spatial ops -----------------------------------------------------------------------------

SPATIAL = [
    case("MaxPool", 13, "h = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)", "float[1,4,4,4] y", {}, {}),
    case("AveragePool", 13, "h = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a)", Y4, {}, {}),
    case("LpPool", 13, "h = LpPool <kernel_shape = [2, 2], strides = [2, 2], p = 2> (a)", "float[1,4,4,4] y", {}, {}),
    case("GlobalMaxPool", 13, "h = GlobalMaxPool(a)", "float[1,4,1,1] y", {}, {}),
    case("GlobalAveragePool", 13, "h = GlobalAveragePool(a)", "float[1,4,1,1] y", {}, {}),
    case("GlobalLpPool", 13, "h = GlobalLpPool <p = 2> (a)", "float[1,4,1,1] y", {}, {}),
    case("Resize_scales_opset13", 13, 'h = Resize <mode = "nearest"> (a, "", Sc)', "float[1,4,16,16] y",
         {"Sc": f32(1, 1, 2, 2)}, {"Sc": (4,)}),
    case("Resize_linear_opset11", 11,
         'h = Resize <mode = "linear", coordinate_transformation_mode = "half_pixel"> (a, Roi, Sc)',
         "float[1,4,16,16] y", {"Roi": np.zeros(0, np.float32), "Sc": f32(1, 1, 2, 2)}, {}),
    case("Resize_scales_opset10", 10, 'h = Resize <mode = "nearest"> (a, Sc)', "float[1,4,16,16] y",
         {"Sc": f32(1, 1, 2, 2)}, {}),
    case("Upsample_opset9", 9, 'h = Upsample <mode = "nearest"> (a, Sc)', "float[1,4,16,16] y",
         {"Sc": f32(1, 1, 2, 2)}, {}),
    case("Pad_inputs_opset11", 11, 'h = Pad <mode = "constant"> (a, P, V)', "float[1,4,10,10] y",
         {"P": i64(0, 0, 1, 1, 0, 0, 1, 1), "V": np.float32(0.5)}, {"P": (8,)}),
    case("Pad_attributes_opset9", 9, 'h = Pad <mode = "constant", pads = [0, 0, 1, 2, 0, 0, 1, 0], value = 0.5> (a)',
         "float[1,4,10,10] y", {}, {}),
    case("Pad_axes_opset18", 18, 'h = Pad (a, P, "", Ax)', "float[1,4,10,10] y",
         {"P": i64(1, 1, 1, 1), "Ax": i64(2, 3)}, {}),
    case("Pad_reflect_spatial", 13, 'h = Pad <mode = "reflect"> (a, P)', "float[1,4,10,10] y",
         {"P": i64(0, 0, 1, 1, 0, 0, 1, 1)}, {}),
    case("Softmax_spatial_opset13", 13, "h = Softmax <axis = 3> (a)", Y4, {}, {}),
    case("LogSoftmax_last_axis_opset13", 13, "h = LogSoftmax <axis = -1> (a)", Y4, {}, {}),
    case("Hardmax_spatial_opset13", 13, "h = Hardmax <axis = 2> (a)", Y4, {}, {}),
    case("Softmax_flatten_from_2_opset11", 11, "h = Softmax <axis = 2> (a)", Y4, {}, {}),
]


@pytest.mark.parametrize("opset, body, out, consts, expect", SPATIAL)
def test_spatial_exact(tmp_path, opset, body, out, consts, expect):
    check_exact_case(tmp_path, opset, body + "\n" + CONSUMER, out, {**consts, **W2}, {**W2_HALF, **expect})


@pytest.mark.parametrize("opset, body, consts, sizes_after", [
    pytest.param(13, 'h = Resize <mode = "linear"> (a, "", "", Sz)', {"Sz": i64(1, 8, 16, 16)}, [1, 4, 16, 16],
                 id="sizes_opset13"),
    pytest.param(18, 'h = Resize <mode = "nearest", axes = [2, 3]> (a, "", "", Sz)', {"Sz": i64(16, 16)}, [16, 16],
                 id="sizes_with_axes_opset18"),
    pytest.param(18, 'h = Resize <mode = "nearest", axes = [1, 2, 3]> (a, "", "", Sz)', {"Sz": i64(8, 16, 16)},
                 [4, 16, 16], id="sizes_with_channel_axis_opset18"),
])
def test_resize_sizes_rewritten(tmp_path, opset, body, consts, sizes_after):
    graph = build(tmp_path, chain(body + "\n" + CONSUMER, "float[1,4,16,16] y"), opset,
                  {"W1": (8, 3, 3, 3), "B1": (8,), **consts, **W2})
    _, pruned = prune_exact(graph)
    assert list(input_value(pruned, nodes(pruned, "Resize")[0], 3)) == sizes_after
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 4, 1, 1)}


def test_pad_channel_axis(tmp_path):
    """Constant padding of the channel axis (1 before, 2 after): input channel i is output
    channel 1 + i; the padding channels are not prunable and stay."""
    body = 'h = Pad <mode = "constant"> (a, P, V)\ny = Conv (h, W2)'
    graph = build(tmp_path, chain(body, Y4), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "P": i64(0, 1, 0, 0, 0, 2, 0, 0), "V": np.float32(0.25),
                   "W2": (4, 11, 1, 1)})
    result, pruned = prune_exact(graph)
    np.testing.assert_array_equal(removed(result, "W2", 1), removed(result, "W1", 0) + 1)
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 7, 1, 1)}


REDUCE = [
    pytest.param(13, "h = ReduceMean <axes = [2, 3], keepdims = 1> (a)", {}, True, id="ReduceMean_attr_keepdims1"),
    pytest.param(13, "h = ReduceMean <axes = [2, 3], keepdims = 0> (a)", {}, False, id="ReduceMean_attr_keepdims0"),
    pytest.param(13, "h = ReduceSum <keepdims = 1> (a, Ax)", {"Ax": i64(2, 3)}, True, id="ReduceSum_input_keepdims1"),
    pytest.param(13, "h = ReduceSum <keepdims = 0> (a, Ax)", {"Ax": i64(-1, -2)}, False,
                 id="ReduceSum_input_negative_axes_keepdims0"),
    pytest.param(18, "h = ReduceMean <keepdims = 1> (a, Ax)", {"Ax": i64(2, 3)}, True, id="ReduceMean_input_opset18_keepdims1"),
    pytest.param(18, "h = ReduceMean <keepdims = 0> (a, Ax)", {"Ax": i64(2, 3)}, False, id="ReduceMean_input_opset18_keepdims0"),
    pytest.param(13, "h = ReduceL2 <axes = [3], keepdims = 0> (a)\nh2 = ReduceMax <axes = [2], keepdims = 0> (h)", {},
                 False, id="ReduceL2_then_ReduceMax_keepdims0"),
]


@pytest.mark.parametrize("opset, body, consts, keepdims", REDUCE)
def test_reduce_spatial(tmp_path, opset, body, consts, keepdims):
    """Reducing spatial axes keeps channels prunable with either keepdims."""
    last = body.splitlines()[-1].split("=")[0].strip()
    if keepdims:
        body, out, consts = body + f"\ny = Conv ({last}, W2)", "float[1,4,1,1] y", {**consts, **W2}
    else:
        body, out, consts = body + f"\ny = Gemm ({last}, G)", "float[1,4] y", {**consts, "G": (8, 4)}
    graph = build(tmp_path, chain(body, out), opset, {"W1": (8, 3, 3, 3), "B1": (8,), **consts})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 8)
    expect = {"W1": (4, 3, 3, 3), **({"W2": (4, 4, 1, 1)} if keepdims else {"G": (4, 4)})}
    assert shapes_of(pruned, expect) == expect


REDUCE_OPS = ["ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"]


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_family(tmp_path, op):
    """Every reduction over H, W (of a positive input, for the logarithms and the product)."""
    body = f"s = Sigmoid(a)\nt = Add(s, half)\nh = {op} <axes = [2, 3]> (t)\n" + CONSUMER
    check_exact_case(tmp_path, 13, body, "float[1,4,1,1] y", {"half": np.float32(0.5), **W2}, W2_HALF)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_argmax_argmin_spatial(tmp_path, op):
    body = f"m = {op} <axis = 3, keepdims = 1> (a)\nf = Cast <to = 1> (m)\n" + CONSUMER.replace("(h", "(f")
    check_exact_case(tmp_path, 13, body, "float[1,4,8,1] y", W2, W2_HALF)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(tmp_path, mode):
    """16 channels -> 4 channels of 2x larger maps: each output channel owns 4 input channels."""
    body = f'h = DepthToSpace <blocksize = 2, mode = "{mode}"> (a)\ny = Conv (h, W2)'
    graph = build(tmp_path, chain(body, "float[1,4,16,16] y"), 13,
                  {"W1": (16, 3, 3, 3), "B1": (16,), "W2": (4, 4, 1, 1)})
    result, pruned = prune_exact(graph)
    group = group_of(result.analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (4, 4)
    gone_out = removed(result, "W2", 1)
    assert len(gone_out) == 2
    owners = removed(result, "W1", 0)
    expected = (owners // 4) if mode == "CRD" else (owners % 4)
    assert set(expected) == set(gone_out) and len(owners) == 8
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (8, 3, 3, 3), "W2": (4, 2, 1, 1)}


def test_space_to_depth(tmp_path):
    body = "h = SpaceToDepth <blocksize = 2> (a)\ny = Conv (h, W2)"
    graph = build(tmp_path, chain(body, "float[1,4,4,4] y"), 13, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 32, 1, 1)})
    result, pruned = prune_exact(graph)
    gone = removed(result, "W1", 0)
    np.testing.assert_array_equal(removed(result, "W2", 1), np.sort((np.arange(4)[:, None] * 8 + gone).ravel()))
    assert shapes_of(pruned, ["W1", "W2"]) == {"W1": (4, 3, 3, 3), "W2": (4, 16, 1, 1)}


@pytest.mark.parametrize("n_rois", [1, 2])
def test_max_roi_pool(tmp_path, n_rois):
    """MaxRoiPool pools each channel of each region: [1, C, H, W] -> [n_rois, C, 2, 2]; the
    channels stay prunable whatever the number of regions."""
    body = "h = MaxRoiPool <pooled_shape = [2, 2]> (a, R)\ny = Conv (h, W2)"
    rois = np.asarray([[0, 0, 0, 7, 7], [0, 2, 2, 5, 6]][:n_rois], np.float32)
    graph = build(tmp_path, chain(body, f"float[{n_rois},4,2,2] y"), 13,
                  {"W1": (8, 3, 3, 3), "B1": (8,), "R": rois, **W2})
    group = group_of(analyze_graph(graph), "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 8), group.blocked_reasons
    _, pruned = prune_exact(graph)
    assert shapes_of(pruned, ["W1", "R", "W2"]) == {"W1": (4, 3, 3, 3), "R": (n_rois, 5), "W2": (4, 4, 1, 1)}


@pytest.mark.parametrize("layout", ["concat", "split"])
def test_ratio_never_empties_an_axis(tmp_path, layout):
    """Eight strong channels and two weak ones in one group (a Concat of an 8- and a 2-filter
    conv, or a Split [8, 2]): --ratio 0.5 removes the 5 weakest units, but must not take every
    channel of the small conv / split part, which would leave a zero-size tensor (the allocator
    promises that no axis is emptied)."""
    if layout == "concat":
        text = chain("b = Conv <pads = [1, 1, 1, 1]> (x, Wsmall)\nh = Concat <axis = 1> (a, b)\ny = Conv (h, W2)", Y4)
        consts = {"W1": (8, 3, 3, 3), "B1": (8,), "Wsmall": (2, 3, 3, 3), "W2": (4, 10, 1, 1)}
        weak = {("Wsmall", 0): [0, 1], ("W2", 1): [8, 9]}
    else:
        text = chain("h1, h2 = Split <axis = 1> (a, S)\ny1 = Conv (h1, W2)\ny2 = Conv (h2, Wsmall)",
                     "float[1,4,8,8] y1, float[1,4,8,8] y2")
        consts = {"W1": (10, 3, 3, 3), "B1": (10,), "S": i64(8, 2), "W2": (4, 8, 1, 1), "Wsmall": (4, 2, 1, 1)}
        weak = {("W1", 0): [8, 9], ("B1", 0): [8, 9], ("Wsmall", 1): [0, 1]}
    graph = build(tmp_path, text, 13, consts)
    weaken(graph, weak, 1e-3)
    result = prune_graph(graph, CONFIG)
    assert result.plan.n_removed == 5
    empty = {t.name: list(t.dims) for t in result.model.graph.initializer if 0 in t.dims}
    assert not empty, f"emptied by pruning: {empty}"
    assert_exact(graph, CONFIG, rtol=RTOL)


# -- barriers ------------------------------------------------------------------------------

BARRIERS = [
    pytest.param(13, "h = LRN <size = 3> (a)", {}, "LRN", id="LRN"),
    pytest.param(13, "h = Softmax <axis = 1> (a)", {}, "Softmax", id="Softmax_channel_axis"),
    pytest.param(11, "h = Softmax <axis = 1> (a)", {}, "Softmax", id="Softmax_flatten_from_1_opset11"),
    pytest.param(13, "s = ReduceSum <keepdims = 1> (a, Ax)\nh = Mul(a, s)", {"Ax": i64(1)}, "ReduceSum",
                 id="ReduceSum_channel_axis"),
    pytest.param(17, "h = LayerNormalization <axis = 1> (a, Ls, Lb)", {"Ls": (8, 8, 8), "Lb": (8, 8, 8)},
                 "LayerNormalization", id="LayerNormalization_over_channels"),
    pytest.param(13, "h = Slice (a, St, En, Ax, Sp)\nh2 = Concat <axis = 1> (h, h)",
                 {"St": i64(0), "En": i64(8), "Ax": i64(1), "Sp": i64(2)}, "Slice", id="Slice_strided_channels"),
    pytest.param(13, "h = Tile (a, R)\nh2 = Slice (h, St, En, Ax)",
                 {"R": i64(1, 2, 1, 1), "St": i64(0), "En": i64(8), "Ax": i64(1)}, "Tile",
                 id="Tile_repeats_channels"),
    pytest.param(13, 'h = Pad <mode = "edge"> (a, P)\nh2 = Slice (h, St, En, Ax)',
                 {"P": i64(0, 1, 0, 0, 0, 0, 0, 0), "St": i64(0), "En": i64(8), "Ax": i64(1)}, "Pad",
                 id="Pad_edge_channel_axis"),
    pytest.param(13, 'h = Resize <mode = "nearest"> (a, "", Sc)', {"Sc": f32(1, 1.1, 1, 1)}, "Resize",
                 id="Resize_scale_keeping_the_channel_count"),
]


@pytest.mark.parametrize("opset, body, consts, op", BARRIERS)
def test_barrier(tmp_path, opset, body, consts, op):
    """Conv1 -> [op mixing channels] -> Conv2 -> Relu -> Conv3: Conv1's channels are blocked by
    the op; Conv2's channels stay prunable and prune exactly."""
    last = body.splitlines()[-1].split("=")[0].strip()
    text = chain(f"""{body}
        b = Conv <pads = [1, 1, 1, 1]> ({last}, Wb, Bb)
        r = Relu (b)
        y = Conv (r, W2)""", Y4)
    graph = build(tmp_path, text, opset,
                  {"W1": (8, 3, 3, 3), "B1": (8,), **consts, "Wb": (8, 8, 3, 3), "Bb": (8,), **W2})
    analysis = analyze_graph(graph)
    blocked = group_of(analysis, "W1", 0)
    assert (len(blocked.units), len(blocked.prunable)) == (8, 0)
    assert blocked.blocked_reasons and all(op in reason for reason in blocked.blocked_reasons), blocked.blocked_reasons
    free = group_of(analysis, "Wb", 0)
    assert (len(free.units), len(free.prunable)) == (8, 8)
    result, pruned = prune_exact(graph)
    assert list(result.plan.removed) == [free.id]
    assert shapes_of(pruned, ["W1", "B1", "Wb", "Bb", "W2"]) == {
        "W1": (8, 3, 3, 3), "B1": (8,), "Wb": (4, 8, 3, 3), "Bb": (4,), "W2": (4, 4, 1, 1)}


def test_maxpool_indices_block_channels(tmp_path):
    """MaxPool's Indices output encodes channel offsets: with it, the channels are blocked."""
    text = chain("""h, idx = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
        y = Conv (h, W2)""", "float[1,4,4,4] y, int64[1,8,4,4] idx")
    graph = build(tmp_path, text, 13, {"W1": (8, 3, 3, 3), "B1": (8,), **W2})
    group = group_of(analyze_graph(graph), "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 0)
    assert any("MaxPool" in reason for reason in group.blocked_reasons), group.blocked_reasons


def test_graph_output_blocks_channels(tmp_path):
    """A conv whose output is a graph output keeps all its channels."""
    text = chain("h = Relu(a)\ny = Conv (h, W2)", f"{Y4}, float[1,8,8,8] h")
    graph = build(tmp_path, text, 13, {"W1": (8, 3, 3, 3), "B1": (8,), **W2})
    analysis = analyze_graph(graph)
    group = group_of(analysis, "W1", 0)
    assert (len(group.units), len(group.prunable)) == (8, 0)
    assert any("graph output 'h'" in reason for reason in group.blocked_reasons)


CUSTOM = """g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {
    a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    m = com.example.MyOp (a)
    y = Conv (m, W2)
    c = Conv <pads = [1, 1, 1, 1]> (x, Wc, Bc)
    r = Relu (c)
    z = Conv (r, Wz)
}"""
CUSTOM_CONSTS = {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "Wc": (8, 3, 3, 3), "Bc": (8,),
                 "Wz": (4, 8, 1, 1)}


@pytest.mark.parametrize("declared", ["nothing", "value_info", "local_function"])
def test_unknown_custom_op(tmp_path, declared):
    """An op of domain com.example that no rule knows: onnxruntime cannot run it (unless the
    model carries it as a local function), so only the analysis is checked. Its input conv's
    channels are blocked with a reason naming the op; the separate conv chain stays prunable."""
    model = make_model(CUSTOM, 13, CUSTOM_CONSTS, domains={"com.example": 1})
    if declared == "value_info":
        model.graph.value_info.append(helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [1, 8, 8, 8]))
    elif declared == "local_function":
        body = helper.make_node("Relu", ["X"], ["Y"])
        model.functions.append(helper.make_function(
            "com.example", "MyOp", ["X"], ["Y"], [body], [helper.make_opsetid("", 13)]))
    path = tmp_path / "custom.onnx"
    onnx.save_model(model, str(path))
    analysis = analyze_graph(load_model(path))
    barriers = [(b.op_type, b.reason) for b in analysis.barriers]
    assert barriers[0] == ("MyOp", "custom op com.example::MyOp is not understood")
    # with no declared shape, the custom op's output shape is unknown, so its reader is blocked too
    assert barriers[1:] == ([("Conv", "the shape of 'm' is unknown")] if declared == "nothing" else [])
    touching = group_of(analysis, "W1", 0)
    assert (len(touching.units), len(touching.prunable)) == (8, 0)
    assert touching.blocked_reasons == ["MyOp node 'MyOp_1': custom op com.example::MyOp is not understood"]
    assert group_of(analysis, "W2", 1) is None  # nothing roots the custom op's output channels
    chain_group = group_of(analysis, "Wc", 0)
    assert chain_group is group_of(analysis, "Wz", 1)
    assert (len(chain_group.units), len(chain_group.prunable)) == (8, 8)
    assert sum(len(g.prunable) for g in analysis.groups) == 8


# -- coverage of the registry ------------------------------------------------------------------

def test_every_registered_op_is_tested():
    """Every op with a registered rule appears in a model of this file or of another
    ``test_op_rules_*.py``: read from its text, as a node (``y = Op (...)`` / ``y = Op <...>``) or
    as an op name parameterising a model."""
    import re

    text = "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_op_rules*.py")))
    used = set(re.findall(r"=\s*([A-Z][A-Za-z0-9]*)\s*[<(]", text)) | set(re.findall(r'"([A-Z][A-Za-z0-9]+)"', text))
    registered = {op for domain, op, *_ in registered_ops() if domain == ""}
    assert len(registered) > 100
    missing = registered - used
    assert not missing, f"op rules without an exactness test: {sorted(missing)}"
