"""Depth units: residual branches found by post-dominance, removed exactly, and the depth pass.

Exactness: the model without a branch equals the original model with that branch's output
forced to zero (a ``Mul`` by 0 inserted before the join, built here independently of the gates
the pass measures with).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from spa_compiler import PruneConfig, load_model, prune
from spa_compiler.depth import find_branches, remove_branches
from spa_compiler.depth_prune import branch_distortions
from spa_compiler.errors import TargetError
from spa_compiler.shapes import synthetic_inputs
from spa_compiler.verify import run_model

from helpers import EXAMPLE

torch = pytest.importorskip("torch")
from models.decoders import build_decoder, export_decoder  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return export_decoder(build_decoder("llama"), tmp_path_factory.mktemp("depth") / "llama.onnx")


def _zeroed(model: onnx.ModelProto, join: str, exit_name: str) -> onnx.ModelProto:
    """``model`` with the join's input ``exit_name`` multiplied by zero."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    zero = numpy_helper.from_array(np.zeros((), np.float32), "test_zero")
    copy.graph.initializer.append(zero)
    nodes = []
    for node in copy.graph.node:
        if node.name == join:
            nodes.append(helper.make_node("Mul", [exit_name, "test_zero"], ["test_zeroed"]))
            node.input[list(node.input).index(exit_name)] = "test_zeroed"
        nodes.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _branch_summary(graph):
    weighted = {"MatMul", "Conv"}
    return [sorted(graph.node_by_name[n].op_type for n in b.nodes if graph.node_by_name[n].op_type in weighted)
            for b in find_branches(graph)]


def test_transformer_branches_are_its_attention_and_ffn_sublayers(llama):
    graph = load_model(llama)
    attention = ["MatMul"] * 6  # q, k, v, o projections, Q·Kᵀ, P·V
    assert _branch_summary(graph) == [attention, ["MatMul"] * 3] * 2


def test_cnn_branches_are_residual_blocks_and_projection_shortcuts():
    graph = load_model(EXAMPLE)
    # two identity blocks, and two downsampling blocks whose body or 1x1 shortcut may go (not both)
    assert _branch_summary(graph) == [["Conv"] * 2, ["Conv"] * 2, ["Conv"], ["Conv"] * 2, ["Conv"] * 2,
                                      ["Conv"], ["Conv"] * 2]


@pytest.mark.parametrize("source", ["llama", "example"])
def test_removing_a_branch_equals_forcing_its_output_to_zero(llama, source):
    graph = load_model(llama if source == "llama" else EXAMPLE)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, 0)
    for branch in find_branches(graph):
        removed = remove_branches(graph, [branch])
        assert len(removed.graph.node) <= len(graph.model.graph.node) - len(branch.nodes)
        onnx.checker.check_model(removed, full_check=True)
        expected = run_model(_zeroed(graph.model, branch.join, branch.exit), feeds)
        actual = run_model(removed, feeds)
        for a, b in zip(expected, actual):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        kept = {t.name for t in removed.graph.initializer}
        assert not kept & {i for n in branch.nodes for i in graph.node_by_name[n].inputs if graph.is_constant(i)
                           and all(c.name in branch.nodes for c in graph.consumers[i])}


def test_each_branch_is_measured_by_its_own_gate():
    """A projection block's join has two branches, its body and its 1x1 shortcut: each branch's
    measured distortion is that of the model with its own output forced to zero."""
    graph = load_model(EXAMPLE)
    branches = find_branches(graph)
    data = synthetic_inputs({"input": (8, *graph.input_shapes["input"][1:])}, graph.dtypes, 3)
    reference = np.concatenate([run_model(graph.model, {"input": x[None]})[0] for x in data["input"]]).astype(np.float64)
    measured = branch_distortions(graph, branches, data)
    for branch, distortion in zip(branches, measured):
        zeroed = _zeroed(graph.model, branch.join, branch.exit)
        y = np.concatenate([run_model(zeroed, {"input": x[None]})[0] for x in data["input"]]).astype(np.float64)
        expected = float(np.sum((y - reference) ** 2) / np.sum(reference ** 2))
        assert distortion == pytest.approx(expected, rel=1e-4), branch.describe(graph)
    assert min(measured) > 1e-3  # no branch of this model is free to remove


def test_branches_past_the_target_are_said_to_be(tmp_path):
    from rich.console import Console

    from spa_compiler.report import render_report

    report = prune(EXAMPLE, tmp_path / "deep.onnx", PruneConfig(flops=0.5, depth=5, bench_runs=0))
    assert len(report.depth) == 5 and report.flops_ratio < 0.48
    assert all(g.channels_after == g.channels_before for g in report.groups)
    console = Console(record=True, width=300)
    render_report(report, console)
    assert f"the branches alone took the flops to {report.flops_ratio:.3f}, past --flops 0.5" in console.export_text()


def test_depth_then_width_meets_the_target_of_the_original(llama, tmp_path):
    report = prune(llama, tmp_path / "depth1.onnx", PruneConfig(flops=0.5, depth=1, bench_runs=0))
    assert len(report.depth) == 1 and "mlp" in report.depth[0]  # an FFN sublayer distorts least per MAC
    assert report.macs_before == pytest.approx(1376256)  # the original model's MACs
    assert report.flops_ratio == pytest.approx(0.5, abs=0.02)
    assert report.fidelity.cosine > 0.9
    pruned = onnx.load(str(tmp_path / "depth1.onnx"))
    assert [i.name for i in pruned.graph.input] == ["input_ids"] and [o.name for o in pruned.graph.output] == ["logits"]


def test_depth_units_alone_remove_branches_until_the_target(llama, tmp_path):
    report = prune(llama, tmp_path / "depth.onnx", PruneConfig(flops=0.75, units="depth", bench_runs=0))
    assert len(report.depth) == 1 and report.flops_ratio <= 0.75
    assert all(g.channels_after == g.channels_before for g in report.groups)


def test_a_model_without_residual_branches_is_refused(tmp_path):
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.ones((8, 8), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(TargetError, match="no removable residual branch"):
        prune(tmp_path / "plain.onnx", tmp_path / "out.onnx", PruneConfig(flops=0.5, depth=1, bench_runs=0))


def test_data_free_depth_units_score_branches_on_the_text_a_language_model_writes(llama):
    """Data-free, the branches of a causal language model are measured on the sequences it
    wrote (those the statistics would use, seed for seed); with ``self_written=False``, on the
    prior's token ids."""
    from spa_compiler.analysis import analyze_graph
    from spa_compiler.cost import node_macs
    from spa_compiler.depth_prune import PruneDepth
    from spa_compiler.self_written import self_written
    from spa_compiler.state import PruneState
    from spa_compiler.synthetic import synthetic_calibration

    graph = load_model(llama)
    analysis = analyze_graph(graph)
    prior = synthetic_calibration(graph, 32, 0)[0]
    expected = self_written(graph, prior, sum(node_macs(analysis).values()), 16, 0).data["input_ids"]
    state = PruneState(PruneConfig(flops=0.7, units="depth"), graph=graph)
    written = PruneDepth(None)._data_free(state, analysis, 32)["input_ids"]
    np.testing.assert_array_equal(written, expected)
    assert np.mean(written[:, 1:] != prior["input_ids"][:, 1:]) > 0.5
    state = PruneState(PruneConfig(flops=0.7, units="depth", self_written=False), graph=graph)
    np.testing.assert_array_equal(PruneDepth(None)._data_free(state, analysis, 32)["input_ids"], prior["input_ids"])
