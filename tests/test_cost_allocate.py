"""Cost model, allocation constraints and criteria, checked against independent numbers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from helpers import assert_exact
from models.zoo import ARCHITECTURES
from spa_compiler import (
    CostModel, PruneConfig, ScoreContext, analyze_graph, get_criterion, load_model, prune_graph,
)


def torch_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of every Conv2d, ConvTranspose2d and Linear, counted with forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output.numel() * module.weight[0].numel()
        elif isinstance(module, torch.nn.ConvTranspose2d):
            total += inputs[0].numel() * module.weight[0].numel()
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(shape))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "unet_tiny", "resnext_tiny", "densenet_tiny"])
def test_macs_match_an_independent_count(exported, name):
    spec = ARCHITECTURES[name]
    expected = torch_macs(spec.builder(), spec.input_shape)
    analysis = analyze_graph(load_model(exported(name)))
    assert CostModel(analysis, "flops").total == expected
    if name == "resnet50":
        assert expected == 4_089_184_256


def test_params_match_the_torch_parameter_count(exported):
    """The exporter folds each BatchNorm into its convolution: gamma and beta become one bias."""
    model = ARCHITECTURES["resnet_tiny_basic"].builder()
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = sum(p.numel() for p in model.parameters()) - sum(m.num_features for m in batchnorms)
    analysis = analyze_graph(load_model(exported("resnet_tiny_basic")))
    assert CostModel(analysis, "params").total == expected == 100_842


@pytest.mark.parametrize("name", ["resnet_tiny_bottleneck", "mobilenet_v3_tiny", "yolo_c2f_tiny"])
def test_predicted_cost_equals_cost_of_the_pruned_model(exported, tmp_path, name):
    result = prune_graph(load_model(exported(name)), PruneConfig(flops=0.5))
    predicted = CostModel(result.analysis, "flops")
    for axis, indices in result.removed_by_axis.items():
        predicted.remove({axis: len(indices)})
    onnx.save(result.model, tmp_path / "pruned.onnx")
    measured = analyze_graph(load_model(tmp_path / "pruned.onnx"))
    assert predicted.total == CostModel(measured, "flops").total
    assert predicted.total / predicted.original_total == pytest.approx(result.plan.achieved)


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    return {t.name: t.dims[0] for t in model.graph.initializer if t.name in conv_weights}


def test_round_to_and_min_keep_hold_in_the_output(exported):
    graph = load_model(exported("resnet50"))
    original = _widths(graph.model)
    result = prune_graph(graph, PruneConfig(flops=0.4, round_to=16, min_keep=0.25, verify=False))
    pruned = _widths(result.model)
    changed = {k for k in original if pruned[k] != original[k]}
    assert len(changed) >= 20
    assert all(pruned[k] % 16 == 0 for k in changed)
    assert all(pruned[k] >= 0.25 * original[k] for k in original)
    assert result.plan.achieved == pytest.approx(0.4, abs=0.02)


def test_uniform_scope_prunes_every_group_by_the_same_ratio(exported):
    result = prune_graph(load_model(exported("resnet_tiny_bottleneck")),
                         PruneConfig(ratio=0.5, scope="uniform", round_to=1, min_keep=0.0, verify=False))
    for group in result.analysis.groups:
        if group.prunable:
            assert len(result.plan.removed[group.id]) == len(group.units) // 2


def test_excluded_node_keeps_its_channels(exported):
    graph = load_model(exported("resnet_tiny_basic"))
    later_conv = [n for n in graph.nodes if n.op_type == "Conv"][2]
    result = prune_graph(graph, PruneConfig(flops=0.6, exclude=(later_conv.name,), round_to=1))
    widths = _widths(result.model)
    assert widths[later_conv.inputs[1]] == graph.shapes[later_conv.inputs[1]][0]
    assert graph.shapes[later_conv.inputs[0]][1] == [
        t.dims[1] for t in result.model.graph.initializer if t.name == later_conv.inputs[1]][0]
    narrowed = [w for w, width in widths.items() if width < graph.shapes[w][0]]
    assert len(narrowed) >= 3 and later_conv.inputs[1] not in narrowed, "the target was met elsewhere"
    assert result.plan.achieved <= 0.62


def _conv_bn_conv(path, opset: int = 13):
    """x -> Conv W1[8,3,3,3] -> BatchNorm(gamma) -> Relu -> Conv W2[4,8,1,1] -> y, seeded."""
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1,3,16,16] x) => (float[1,4,16,16] y) {{
            a = Conv <pads = [1, 1, 1, 1]> (x, W1)
            b = BatchNormalization (a, Gamma, Beta, Mean, Var)
            r = Relu (b)
            y = Conv (r, W2)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(11)
    values = {
        "W1": rng.standard_normal((8, 3, 3, 3)), "Gamma": rng.standard_normal(8), "Beta": rng.standard_normal(8),
        "Mean": rng.standard_normal(8), "Var": 0.5 + rng.random(8), "W2": rng.standard_normal((4, 8, 1, 1)),
    }
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in values.items())
    onnx.save(model, path)
    return {n: v.astype(np.float32) for n, v in values.items()}


def test_l1_l2_bn_scale_and_random_scores(tmp_path):
    values = _conv_bn_conv(tmp_path / "m.onnx")
    analysis = analyze_graph(load_model(tmp_path / "m.onnx"))
    group, output_group = analysis.groups
    assert (len(group.units), len(group.prunable), len(output_group.prunable)) == (8, 8, 0)
    context = ScoreContext(analysis)
    w1, w2 = values["W1"].astype(np.float64), values["W2"].astype(np.float64)
    l1 = np.abs(w1).sum(axis=(1, 2, 3)) + np.abs(w2).sum(axis=(0, 2, 3))
    l2 = np.sqrt(np.square(w1).sum(axis=(1, 2, 3)) + np.square(w2).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(get_criterion("l1").score(group, context), l1, rtol=1e-9)
    np.testing.assert_allclose(get_criterion("l2").score(group, context), l2, rtol=1e-9)
    np.testing.assert_allclose(get_criterion("bn_scale").score(group, context), np.abs(values["Gamma"]), rtol=1e-6)
    random_a = get_criterion("random").score(group, ScoreContext(analysis, seed=4))
    random_b = get_criterion("random").score(group, ScoreContext(analysis, seed=4))
    np.testing.assert_array_equal(random_a, random_b)
    assert not np.array_equal(random_a, get_criterion("random").score(group, ScoreContext(analysis, seed=5)))


def test_pruning_removes_the_lowest_scored_channels(tmp_path):
    values = _conv_bn_conv(tmp_path / "m.onnx")
    result = prune_graph(load_model(tmp_path / "m.onnx"), PruneConfig(ratio=0.5, round_to=1, criterion="bn_scale"))
    kept = sorted(set(range(8)) - set(result.removed_by_axis[result.analysis.axis_id("Gamma", 0)].tolist()))
    assert kept == sorted(np.argsort(np.abs(values["Gamma"]))[4:].tolist())


@pytest.mark.parametrize("opset", [9, 13, 18, 21, 23])
def test_every_supported_opset_loads_and_prunes_exactly(tmp_path, opset):
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1,3,16,16] x) => (float[1,4,16,16] y) {{
            a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            r = Relu (a)
            p = MaxPool <kernel_shape = [2, 2], strides = [1, 1], pads = [0, 0, 1, 1]> (r)
            y = Conv (p, W2)
        }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(opset)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("W1", (32, 3, 3, 3)), ("B1", (32,)), ("W2", (4, 32, 1, 1)))
    ])
    onnx.save(model, tmp_path / "m.onnx")
    graph = load_model(tmp_path / "m.onnx")
    pruned = assert_exact(graph, PruneConfig(ratio=0.5, round_to=1), rtol=1e-4)
    assert pruned.opset_import[0].version == opset
    assert [list(t.dims) for t in pruned.graph.initializer if t.name == "W1"] == [[16, 3, 3, 3]]
