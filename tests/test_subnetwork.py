"""Parts of a network run on their own (the sensitivity measurements' tails, the re-fit's
prefixes and its one run of the original network) and the budgets that bound those runs."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

import spa_compiler.sensitivity as sensitivity
from spa_compiler import PruneConfig, PruneState, load_model
from spa_compiler.calibrate import consumer_layers, exposing, with_weight_inputs
from spa_compiler.paired import PairedRunner
from spa_compiler.refit import stage_samples
from spa_compiler.sensitivity import TailRunner, measurement_plan, scaled_by_scores
from spa_compiler.stages import Analyse
from spa_compiler.subnetwork import prefix_model, tail_model
from spa_compiler.verify import session_for

from helpers import EXAMPLE


@pytest.fixture(scope="module")
def graph():
    return load_model(EXAMPLE)


@pytest.fixture(scope="module")
def samples(graph):
    shape = graph.input_shapes[graph.inputs[0]]
    return {graph.inputs[0]: np.random.default_rng(0).standard_normal((3, *shape[1:])).astype(np.float32)}


def _middle_conv(graph):
    convs = [node for node in graph.model.graph.node if node.op_type == "Conv"]
    return convs[len(convs) // 2]


def _whole(model, names, samples, weights=None):
    """``names`` of ``model`` run one sample at a time (the example's batch is fixed)."""
    session = session_for(exposing(model, names))
    runs = [session.run(names, {**{k: v[i:i + 1] for k, v in samples.items()}, **(weights or {})})
            for i in range(len(next(iter(samples.values()))))]
    return [np.concatenate(parts) for parts in zip(*runs)]


def test_tail_and_prefix_compute_what_the_whole_model_does(graph, samples):
    conv = _middle_conv(graph)
    weight = conv.input[1]
    changed = {weight: (graph.constants[weight] * np.float32(0.5))}
    model = with_weight_inputs(graph.model, {weight})
    part, boundary = tail_model(model, {weight}, graph.dtypes)
    assert 0 < len(part.graph.node) < len(model.graph.node)
    assert conv.input[0] in boundary and len(boundary) >= 2  # the conv's input and a residual branch's
    expected = _whole(model, list(graph.outputs) + boundary, samples, changed)
    values = dict(zip(list(graph.outputs) + boundary, _whole(model, list(graph.outputs) + boundary, samples)))
    session = session_for(part)
    tail = [session.run(None, {**{name: values[name][i:i + 1] for name in boundary}, **changed}) for i in range(3)]
    np.testing.assert_allclose(np.concatenate([run[0] for run in tail]), expected[0], rtol=1e-5, atol=1e-6)

    prefix = prefix_model(graph.model, [conv.input[0]])
    assert len(prefix.graph.node) < len(graph.model.graph.node)
    np.testing.assert_array_equal(_whole(prefix, [conv.input[0]], samples)[0], values[conv.input[0]])


def test_tail_runner_gives_the_whole_models_outputs(graph, samples, monkeypatch):
    weight = _middle_conv(graph).input[1]
    model = with_weight_inputs(graph.model, {weight})
    new = {weight: graph.constants[weight] * np.float32(0.5)}
    expected = _whole(model, list(graph.outputs), samples, new)[0]
    runner = TailRunner(graph, model, samples, [{weight}])
    assert runner.boundary_runs is not None
    np.testing.assert_allclose(runner.reference[graph.outputs[0]], _whole(model, list(graph.outputs), samples)[0], rtol=1e-6)
    np.testing.assert_allclose(runner.tail({weight})(new)[graph.outputs[0]], expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(sensitivity, "CACHE_BYTES", 0)  # boundary too large to keep: whole-model runs
    whole = TailRunner(graph, model, samples, [{weight}])
    assert whole.boundary_runs is None
    np.testing.assert_allclose(whole.tail({weight})(new)[graph.outputs[0]], expected, rtol=1e-6)


def test_paired_rows_of_an_unpruned_network_pair_with_themselves(graph, samples):
    analysis = Analyse().run(PruneState(PruneConfig(flops=0.5), graph=graph)).analysis
    layers = consumer_layers(analysis)
    runner = PairedRunner(graph, graph.model, layers, {layers[0].weight})
    runner.cache_original([(layers, 3)], samples, seed=0, rows_per_feature=10**6)  # every row
    stats = runner.statistics(layers, samples, {layers[0].weight: graph.constants[layers[0].weight]})
    assert set(stats) == {layer.node for layer in layers}
    for layer in layers:
        paired = stats[layer.node]
        scale = np.abs(paired.gram).max()
        np.testing.assert_allclose(paired.gram, paired.cross, atol=1e-6 * scale)  # x̃ = x at every row (float32 sums)
        rows = paired.gram[:, -1, -1]
        assert rows[0] == 2 * rows[1] > 0  # fold 0: samples 0 and 2, fold 1: sample 1


def test_measurement_plan_fits_the_budget():
    costs = [(1e9, 4)] * 10  # ten groups, 1 GMAC parts, four widths each: 4e10 MACs per sample
    assert measurement_plan(costs, 32, 2e12) == (32, True)
    assert measurement_plan(costs, 32, 4e11) == (10, True)
    assert measurement_plan(costs, 32, 1e11) == (10, False)  # 8 samples at every width cost 3.2e11
    assert measurement_plan(costs, 32, 1e9) == (8, False)  # never below LEAST_SAMPLES
    assert measurement_plan(costs, 2, 1e9) == (2, False)


def test_one_measurement_is_scaled_by_the_cumulative_scores():
    scores = np.array([1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(scaled_by_scores(scores, 2, 0.1, [1, 2, 3, 4]), [0.05, 0.1, 0.2, 0.4])
    np.testing.assert_allclose(scaled_by_scores(np.zeros(4), 2, 0.1, [1, 4]), [0.05, 0.2])


def test_stage_samples_are_capped_to_the_budget():
    prefix = [1.0, 2.0, 3.0, 4.0]  # c samples cost c·4 (the original's run) + c·(1 + 2 + 3 + 4) = 14c
    assert stage_samples(200, prefix, 4.0, 3000.0, 8) == 200  # 2800: every sample
    assert stage_samples(224, prefix, 4.0, 3000.0, 8) == 214  # 3136 for all; 214 · 14 = 2996
    assert stage_samples(224, prefix, 4.0, 500.0, 8) == 35
    assert stage_samples(224, prefix, 4.0, 10.0, 8) == 8  # never below the least
    assert stage_samples(5, prefix, 4.0, 10.0, 5) == 5


def _paired_folds(seed: int, bias: bool = True):
    """Two folds of paired statistics (4 of 6 features kept, noisy), original weights and present ones."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((40, 7)) for _ in (0, 1)]  # two folds of original features (the last a constant 1)
    for fold in rows:
        fold[:, -1] = 1.0
    pruned = [np.hstack([x[:, :4] * rng.uniform(0.5, 2.0, 4) + 0.1 * rng.standard_normal((40, 4)), x[:, -1:]])
              for x in rows]
    if not bias:
        pruned = [p[:, :-1] for p in pruned]
    gram = np.stack([p.T @ p for p in pruned])
    cross = np.stack([p.T @ x for p, x in zip(pruned, rows)])
    target, prior = rng.standard_normal((30, 7)), rng.standard_normal((30, 5 if bias else 4))
    return gram, cross, target, prior


def test_ridge_errors_by_traces_equal_those_of_the_refitted_weights():
    from spa_compiler.refit import _applied, _output_error, _refit, _traced_errors

    gram, cross, target, prior = _paired_folds(3)
    for trust in (1.0, 0.5):  # the weights as applied: P + t (W̃ − P)
        traced = _traced_errors(gram, cross, target, prior, bias=True, trust=trust)
        for ridge in (0.001, 0.1, 10.0):
            direct = sum(
                _output_error(_applied(_refit(gram[1 - f], cross[1 - f] @ target.T, prior, ridge, True), prior, trust),
                              gram[f], cross[f] @ target.T)
                for f in (0, 1))
            np.testing.assert_allclose(traced(ridge), direct, rtol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_few_parameter_errors_equal_those_of_the_refitted_weights(bias):
    """The closed-form errors of the scales, bias-only and unchanged re-fits (from ``PᵀP``) are
    those of the weights formed and multiplied out, and scaled inputs are undone by the scales."""
    from spa_compiler.refit import _few_parameter_error, _few_parameters, _output_error, _refit

    gram, cross, target, prior = _paired_folds(4, bias)
    if not bias:
        target = target[:, :-1]
        cross = cross[:, :, :-1]
    weight_features = 4
    prior_gram = prior[:, :weight_features].T @ prior[:, :weight_features]
    for kind in ("scales", "bias only", "unchanged"):
        for f in (0, 1):
            target_cross = cross[1 - f] @ target.T
            formed = _refit(gram[1 - f], target_cross, prior, kind, bias)
            scales, shifted = _few_parameters(kind, gram[1 - f], target_cross, prior, bias, prior_gram)
            np.testing.assert_allclose(
                _few_parameter_error(scales, shifted, prior, prior_gram, gram[f], cross[f] @ target.T),
                _output_error(formed, gram[f], cross[f] @ target.T), rtol=1e-9)
            if kind == "unchanged":
                np.testing.assert_array_equal(formed, prior)


def test_least_ridge_walks_downhill_from_the_middle():
    from spa_compiler.refit import least_ridge

    ridges = [0.001, 0.01, 0.1, 1.0, 10.0]
    for best in range(5):
        asked = []

        def error(ridge):
            asked.append(ridge)
            return (np.log10(ridge) - np.log10(ridges[best])) ** 2 + 1.0

        assert least_ridge(ridges, error) == (ridges[best], 1.0)
        assert len(asked) == len(set(asked)) == {0: 3, 1: 3, 2: 3, 3: 4, 4: 4}[best]
    assert least_ridge(ridges, lambda ridge: 2.0) == (0.001, 2.0)  # ties: the weakest ridge
    assert least_ridge([0.5], lambda ridge: 3.0) == (0.5, 3.0)


def test_held_out_choice_is_the_least_error_of_every_candidate():
    """On folds whose errors fall and rise with the ridge, the choice is the candidate that
    an evaluation of every one of them picks."""
    from spa_compiler.refit import RIDGES, _applied, _output_error, _refit, held_out_ridge

    for seed, trust in itertools.product(range(6), (1.0, 0.5)):  # the re-fits as applied: P + t (W̃ − P)
        gram, cross, target, prior = _paired_folds(seed)
        errors = {
            ridge: sum(_output_error(_applied(_refit(gram[1 - f], cross[1 - f] @ target.T, prior, ridge, True), prior, trust),
                                     gram[f], cross[f] @ target.T) for f in (0, 1))
            for ridge in RIDGES
        }
        assert held_out_ridge(gram, cross, target, prior, True, trust=trust) == min(errors, key=errors.get)


def test_one_width_per_group_when_the_budget_is_small(tmp_path):
    """With a budget too small for every width, each group is measured once, at its middle
    count, and its scores add up to that measured distortion there, computed here by a run of
    the whole model with the compensated weights."""
    from spa_compiler import Pipeline, default_passes
    from spa_compiler.sensitivity import MeasureSensitivity

    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32))
    config = PruneConfig(flops=0.5, calibration=str(path), criterion="obs", refit_rounds=0, round_to=8)
    state = Pipeline(default_passes(config)).until("score")(PruneState(config, graph=load_model(EXAMPLE)))
    criterion_scores = dict(state.scores)
    measure = MeasureSensitivity(samples=4, budget=1.0)
    analysis = state.analysis
    group = max((g for g in analysis.groups if g.prunable), key=lambda g: len(g.units))
    order = sorted(group.prunable, key=lambda k: (criterion_scores[group.id][k], k))
    counts = measure._counts(group, len(order), config.min_keep, config.constraints().rounding_for(len(group.units)))
    middle = counts[len(counts) // 2]
    layers = {analysis.axis_id(s.layer.weight, s.layer.axis): s for s in state.statistics.values()}
    weights = measure._pruned_weights(state, layers, group, order[:middle])
    model = with_weight_inputs(state.graph.model, set(weights))
    x = {"input": state.calibration_data["input"][:4]}
    outputs = list(state.graph.outputs)
    reference, pruned = _whole(model, outputs, x)[0], _whole(model, outputs, x, weights)[0]
    measured = float(np.sum((pruned - reference) ** 2) / np.sum(reference.astype(np.float64) ** 2))
    scores = measure.run(state).scores[group.id]
    assert measured > 0
    np.testing.assert_allclose(np.sum(scores[order[:middle]]), measured, rtol=1e-4)


def test_one_ahead_starts_the_next_run_before_handing_over_a_result():
    """Results come in the items' order, and while the caller holds item k's result the run of
    item k + 1 has begun (the wait would time out if runs started only when asked for)."""
    from spa_compiler.paired import one_ahead

    begun = {k: threading.Event() for k in (1, 2, 3)}

    def run(item: int) -> int:
        begun[item].set()
        return item * item

    handed = []
    for item, result in one_ahead(run, [1, 2, 3]):
        handed.append((item, result))
        if item < 3:
            assert begun[item + 1].wait(timeout=10)
    assert handed == [(1, 1), (2, 4), (3, 9)]
    assert list(one_ahead(run, [])) == []
