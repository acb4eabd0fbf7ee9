"""Rotating attention heads before pruning head dimensions (spa_compiler.head_rotation,
spa_compiler.attention_heads)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from helpers import relative_error
from spa_compiler import PruneConfig, analyze_graph, load_model, prune_graph
from spa_compiler.attention_heads import rotatable_heads
from spa_compiler.head_rotation import (
    TOLERANCE, GroupRotation, RotateHeads, query_key_bases, rotate_heads, rotated_graph, value_output_bases,
)
from spa_compiler.shapes import synthetic_inputs
from spa_compiler.verify import fidelity, run_model
from test_attention import HEAD_DIM, HEADS, HIDDEN, _attention_model, attention_tail
from test_cli import run_cli

SHAPES = {"x": (1, 6, HIDDEN)}


def _moment(rng: np.random.Generator, size: int, rows: int = 400) -> np.ndarray:
    x = rng.standard_normal((rows, size)) @ (np.eye(size) + 0.3 * rng.standard_normal((size, size)))
    return x.T @ x / rows


def test_query_key_bases_keep_the_scores_and_order_the_dimensions():
    rng = np.random.default_rng(0)
    c_query, c_key = _moment(rng, 8), _moment(rng, 8)
    a, b, s = query_key_bases(c_query, c_key)
    np.testing.assert_allclose(a @ b.T, np.eye(8), atol=1e-9)
    np.testing.assert_allclose(a.T @ c_query @ a, np.diag(s), atol=1e-4 * s[0])
    np.testing.assert_allclose(b.T @ c_key @ b, np.diag(s), atol=1e-4 * s[0])
    assert np.all(np.diff(s) <= 0)


def test_keys_that_are_all_the_same_carry_nothing():
    """One token per sequence (MobileViT's deepest patches at 64x64): the keys' covariance is zero,
    here -1e-66 on the diagonal by rounding, which no Cholesky factor takes. Every key scores the
    same, so the head's dimensions carry nothing and keep their basis."""
    rng = np.random.default_rng(2)
    vanished = -1e-66 * np.eye(8) + 1e-67 * np.ones((8, 8))
    a, b, s = query_key_bases(_moment(rng, 8), vanished)
    np.testing.assert_array_equal(a @ b.T, np.eye(8))
    np.testing.assert_array_equal(s, np.zeros(8))


def test_value_output_bases_whiten_the_values_and_order_the_rows():
    rng = np.random.default_rng(1)
    c_output, rows = _moment(rng, 8), rng.standard_normal((8, 32))
    forward, backward, s = value_output_bases(c_output, rows)
    np.testing.assert_allclose(forward @ backward, np.eye(8), atol=1e-9)
    np.testing.assert_allclose(forward.T @ c_output @ forward, np.eye(8), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(backward @ rows, axis=1), s, rtol=1e-9)
    assert np.all(np.diff(s) <= 0)


def _rotated(tmp_path, seed=0):
    graph = load_model(_attention_model(tmp_path / "attention.onnx", seed), SHAPES)
    bases = rotatable_heads(analyze_graph(graph, head_dims=True))
    data = {"x": np.random.default_rng(seed + 1).standard_normal((64, 6, HIDDEN)).astype(np.float32)}
    rotations = rotate_heads(graph, bases, data, {})
    values = {name: value for rotation in rotations for name, value in rotation.values.items()}
    return graph, bases, rotated_graph(graph, values), {r.basis.group.id: r.energy for r in rotations}, data


def _role(bases, values: bool):
    """The basis of the values and output (``values``) or of the queries and keys."""
    (basis,) = [b for b in bases if (b.value_output if values else b.query_key)]
    return basis


def test_rotation_keeps_the_function_and_leaves_the_input_graph(tmp_path):
    graph, bases, rotated, energies, data = _rotated(tmp_path)
    query_key, value_output = _role(bases, False), _role(bases, True)  # two groups, each its own basis
    assert [p.layer.weight for p in [*query_key.query_key, *value_output.value_output]] == ["Wq", "Wk", "Wv", "Wo"]
    assert [p.heads.shape for p in query_key.query_key] == [(HEADS, HEAD_DIM)] * 2
    before = {name: graph.constants[name].copy() for name in ("Wq", "Wk", "Wv", "Wo", "Bq")}
    feeds = {"x": data["x"][:8]}
    assert relative_error(run_model(graph.model, feeds), run_model(rotated.model, feeds)) < 1e-5
    assert not np.allclose(rotated.constants["Wq"], before["Wq"], atol=1e-3)
    for name, value in before.items():
        np.testing.assert_array_equal(graph.constants[name], value)
    for energy in energies.values():
        assert np.all(np.diff(energy) <= 0) and energy[-1] < 0.5 * energy[0]


def test_a_rotation_that_changes_the_outputs_is_dropped(tmp_path):
    """The pass checks the rotated model against the original on calibration samples: the
    true rotation keeps the outputs within float32 rounding, one with its query weights off
    by 1% does not and is dropped."""
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), SHAPES)
    data = {"x": np.random.default_rng(1).standard_normal((64, 6, HIDDEN)).astype(np.float32)}
    (rotation,) = [r for r in rotate_heads(graph, rotatable_heads(analyze_graph(graph, head_dims=True)), data, {})
                   if r.basis.query_key]
    kept, error = RotateHeads._exact(graph, [rotation], data)
    assert kept == [rotation] and error < 1e-5
    off = {**rotation.values, "Wq": rotation.values["Wq"] * np.float32(1.01)}
    wrong = GroupRotation(rotation.basis, off, rotation.energy, rotation.feature_change)
    kept, error = RotateHeads._exact(graph, [wrong], data)
    assert kept == [] and error > TOLERANCE


PACKED = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 6, 32] x) => (float[1, 6, 32] y) {{
        qkv0 = MatMul (x, Wqkv)
        qkv1 = Add (qkv0, Bqkv)
        qkv2 = Reshape (qkv1, Split5)
        qkv = Transpose <perm = [2, 0, 3, 1, 4]> (qkv2)
        q = Gather <axis = 0> (qkv, Second)
        k0 = Gather <axis = 0> (qkv, First)
        v = Gather <axis = 0> (qkv, Third)
        k = Transpose <perm = [0, 1, 3, 2]> (k0)
{attention_tail("Merge3")}    }}
"""
"""A ViT-style attention: one packed projection, reshaped to [1, 6, 3, 4, 8] and taken apart by
Gather (keys first, then queries, then values), 4 heads of 8 dimensions."""


def test_a_packed_projection_rotates_each_role_exactly(tmp_path):
    model = onnx.parser.parse_model(PACKED)
    rng = np.random.default_rng(0)
    floats = {"Wqkv": rng.standard_normal((32, 96)) / np.sqrt(32), "Bqkv": rng.standard_normal(96) * 0.1,
              "Wo": rng.standard_normal((32, 32)) / np.sqrt(32), "Bo": rng.standard_normal(32) * 0.1,
              "Scale": np.array(np.sqrt(8))}
    ints = {"Split5": np.array([1, 6, 3, 4, 8]), "Merge3": np.array([1, 6, 32]),
            "First": np.array(0), "Second": np.array(1), "Third": np.array(2)}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in floats.items())
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.int64), n) for n, v in ints.items())
    onnx.save(model, tmp_path / "packed.onnx")
    graph = load_model(tmp_path / "packed.onnx")
    (basis,) = rotatable_heads(analyze_graph(graph, head_dims=True))
    (query, key), (value, output) = basis.query_key, basis.value_output
    assert {query.layer.weight, key.layer.weight, value.layer.weight, output.layer.weight} == {"Wqkv", "Wo"}
    # columns t*32 + h*8 + d: keys are slice 0, queries slice 1, values slice 2
    np.testing.assert_array_equal(key.heads[:, 0], [0, 8, 16, 24])
    np.testing.assert_array_equal(query.heads[:, 0], [32, 40, 48, 56])
    np.testing.assert_array_equal(value.heads[:, 0], [64, 72, 80, 88])
    data = {"x": rng.standard_normal((64, 6, 32)).astype(np.float32)}
    kept, error = RotateHeads._exact(graph, rotate_heads(graph, [basis], data, {}), data)
    assert len(kept) == 1 and error < 1e-5


def _zero_last(graph, bases, count, values: bool):
    """A copy of the model with the last ``count`` dimensions of every head zeroed on the
    producing side of the queries and keys or (``values``) of the values."""
    basis = _role(bases, values)
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    producers = basis.value_output[:1] if values else basis.query_key
    drop = producers[0].heads[:, -count:].ravel()
    names = {name for p in producers for name in (p.layer.weight, p.layer.bias) if name}
    for tensor in model.graph.initializer:
        if tensor.name in names:
            value = onnx.numpy_helper.to_array(tensor).copy()
            value[..., drop] = 0
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    return model


def test_the_last_dimensions_after_rotation_cost_less_than_any_before(tmp_path):
    """Dropping 4 of 8 dimensions per head (seeded random weights and inputs): the rotated basis
    loses less than the original basis: relative output error 0.32 against 0.46 (queries and
    keys), 0.43 against 0.64 (values)."""
    graph, bases, rotated, _, data = _rotated(tmp_path)
    feeds = {"x": data["x"][:32]}
    reference = run_model(graph.model, feeds)
    rotated_bases = rotatable_heads(analyze_graph(rotated, head_dims=True))
    for values in (False, True):
        plain = relative_error(reference, run_model(_zero_last(graph, bases, 4, values), feeds))
        after = relative_error(reference, run_model(_zero_last(rotated, rotated_bases, 4, values), feeds))
        assert after < 0.75 * plain, (values, after, plain)


def _scaled_model(tmp_path):
    """The attention model with its queries scaled per head dimension on their way to Q·Kᵀ."""
    model = onnx.load(_attention_model(tmp_path / "attention.onnx"))
    nodes = model.graph.node
    for node in nodes:
        if node.op_type == "Transpose" and node.input[0] == "q2":
            node.input[0] = "q2s"
    nodes.insert([n.output[0] for n in nodes].index("q2") + 1, onnx.helper.make_node("Mul", ["q2", "DimScale"], ["q2s"]))
    scale = np.linspace(0.5, 1.5, HEAD_DIM).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(scale, "DimScale"))
    onnx.save(model, tmp_path / "scaled.onnx")
    return tmp_path / "scaled.onnx"


@pytest.mark.accurate
def test_forced_head_dims_keep_unrotatable_queries_and_keys_whole(tmp_path):
    """--head-dims on attention whose queries/keys cannot be rotated: their head dimensions
    (which no weight reads, so no measurement can emulate their removal) are kept whole; the
    values' are rotated and pruned."""
    graph = load_model(_scaled_model(tmp_path), SHAPES)
    state = prune_graph(graph, PruneConfig(flops=0.8, round_to=1, head_dims=True))
    dims = {g.name: g for g in state.analysis.groups if state.analysis.kind(g) == "head dims"}
    assert len(dims) == 2 and len(state.rotation.energies) == 1
    (rotated,) = state.rotation.energies
    for group in dims.values():
        removed = len(state.plan.removed.get(group.id, []))
        assert (removed > 0) if group.id == rotated else (removed == 0), (group.name, removed)


def test_a_per_dimension_scale_on_the_way_keeps_the_basis(tmp_path):
    """A Mul by a [head_dim] vector (a norm's scale, a rotary table) does not commute with a
    change of basis: the group it is in (here the queries and keys) keeps its basis; the values
    and output, a group of their own, rotate."""
    path = _scaled_model(tmp_path)
    analysis = analyze_graph(load_model(path, SHAPES), head_dims=True)
    assert [analysis.kind(g) for g in analysis.groups].count("head dims") == 2
    (basis,) = rotatable_heads(analysis)
    assert basis.query_key is None and [p.layer.weight for p in basis.value_output] == ["Wv", "Wo"]


@pytest.mark.accurate
def test_pruning_head_dims_rotates_and_measures_fidelity_to_the_input(tmp_path):
    """The default pipeline with --head-dims rotates both groups, leaves the caller's graph as it
    was, and reports fidelity to that graph (not to the rotated one)."""
    graph = load_model(_attention_model(tmp_path / "attention.onnx"), SHAPES)
    weights = graph.constants["Wq"].copy()
    state = prune_graph(graph, PruneConfig(flops=0.6, round_to=1, head_dims=True))
    dims = [g for g in state.analysis.groups if state.analysis.kind(g) == "head dims"]
    assert "rotate" in state.timings and sorted(state.rotation.energies) == sorted(g.id for g in dims)
    assert state.rotation.original is graph and state.graph is not graph
    np.testing.assert_array_equal(graph.constants["Wq"], weights)
    assert all(state.plan.removed.get(g.id) for g in dims)  # both pruned (measured 4 and 3 of 8)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, state.config.seed)
    expected = fidelity(run_model(graph.model, feeds), run_model(state.model, feeds))
    assert abs(state.fidelity.cosine - expected.cosine) < 1e-6 and state.fidelity.cosine > 0.7


@pytest.mark.accurate
def test_head_dims_by_default_only_where_statistics_rotate_every_head(tmp_path):
    """Left unset, the default pipeline (statistics) prunes rotated head dimensions; a pipeline
    without statistics (L2, allocation by scores, no re-fit) prunes whole heads, as does a
    model whose heads cannot all be rotated."""
    path = _attention_model(tmp_path / "attention.onnx")
    with_statistics = prune_graph(load_model(path, SHAPES), PruneConfig(flops=0.7))
    assert "head dims" in {with_statistics.analysis.kind(g) for g in with_statistics.analysis.groups}
    assert len(with_statistics.rotation.energies) == 2  # queries/keys, values/output
    fast = PruneConfig(flops=0.7, criterion="l2", allocation="score", refit_rounds=0)
    without = prune_graph(load_model(path, SHAPES), fast)
    assert "heads" in {without.analysis.kind(g) for g in without.analysis.groups}
    scaled = prune_graph(load_model(_scaled_model(tmp_path), SHAPES), PruneConfig(flops=0.7))
    assert "heads" in {scaled.analysis.kind(g) for g in scaled.analysis.groups} and not scaled.rotation.energies


@pytest.mark.accurate
def test_command_line_reports_the_rotation_and_analyze_says_what_pruning_uses(tmp_path):
    _attention_model(tmp_path / "attention.onnx")
    shape = ["--input-shape", "x=1x6x32"]
    analysed = run_cli(tmp_path, "attention.onnx", "--analyze", *shape, columns=200)
    assert analysed.returncode == 0, analysed.stderr
    assert "4 heads" in analysed.stdout and "prunes rotated head dimensions instead" in analysed.stdout
    dims = run_cli(tmp_path, "attention.onnx", "--analyze", "--head-dims", *shape, columns=200)
    assert "8 head dims" in dims.stdout and "prunes rotated" not in dims.stdout
    pruned = run_cli(tmp_path, "attention.onnx", "-o", "out.onnx", "--flops", "0.7", *shape, columns=200, fast=False)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert re.search(r"head dimensions: 2 attention groups .* rotated first .*within \d\.\de-0[5-9]", pruned.stdout), pruned.stdout
    assert (tmp_path / "out.onnx").exists()
