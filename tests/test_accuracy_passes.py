"""The accuracy passes: sequential re-fit, measured sensitivity, held-out fidelity and --eval."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from spa_compiler import InputError, Pipeline, PruneConfig, PruneState, default_passes, load_model, prune
from spa_compiler.calibrate import ConsumerLayer
from spa_compiler.paired import PairedStatistics
from spa_compiler.refit import refit_layer
from spa_compiler.sensitivity import samples_for
from spa_compiler.report import fidelity_warning, synthetic_only
from spa_compiler.criteria import ScoreContext, get_criterion
from spa_compiler.rewrite import removed_indices, rewrite_model
from spa_compiler.secondorder import compensate_layer
from spa_compiler.sensitivity import MeasureSensitivity, convex_increments, strictly_increasing
from spa_compiler.stages import split_held_out

from helpers import EXAMPLE

pytestmark = pytest.mark.accurate


def test_convex_increments_follow_the_lower_hull():
    counts, distortions = np.array([4, 8, 12]), np.array([1.0, 1.5, 5.0])
    increments = convex_increments(counts, distortions, 14)
    np.testing.assert_allclose(increments, [0.1875] * 8 + [0.875] * 6, rtol=1e-12)
    assert increments[:12].sum() == pytest.approx(5.0)


def test_strictly_increasing_breaks_ties_in_the_given_order():
    increments = convex_increments(np.array([4, 8]), np.array([1.0, 3.0]), 8)  # two straight pieces
    assert len(set(increments.tolist())) <= 3  # ties (up to rounding) along each piece
    strict = strictly_increasing(increments)
    assert np.all(np.diff(strict) > 0)
    np.testing.assert_allclose(strict, increments, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(strictly_increasing(np.zeros(3)), [0.0, 5e-324, 1e-323])


def _orders(scores: dict[int, np.ndarray], group) -> list[int]:
    return sorted(group.prunable, key=lambda k: (scores[group.id][k], k))


def test_sensitivity_keeps_the_criterion_order_within_each_group():
    """Data-free, measured distortions decide how many units a group loses, the criterion which
    ones: every group's units ranked by the sensitivity scores come in the criterion's order
    (units along a straight piece of a distortion curve once came in index order)."""
    config = PruneConfig(flops=0.5, round_to=8)
    pipeline = Pipeline(default_passes(config))
    criterion = pipeline.until("score")(PruneState(config, graph=load_model(EXAMPLE))).scores
    state = pipeline.until("sensitivity")(PruneState(config, graph=load_model(EXAMPLE)))
    assert state.order_choice is None  # data-free: no choice of order
    ranked = [g for g in state.analysis.groups
              if len(g.prunable) > 1 and np.all(np.isfinite(state.scores[g.id][g.prunable]))]
    assert len(ranked) >= 4
    for group in ranked:
        assert _orders(state.scores, group) == _orders(criterion, group), group.name


def test_calibrated_sensitivity_keeps_the_order_that_distorts_less(calibration):
    """With --calib each group goes in obs's order or obs_joint's, whichever distorts the
    outputs less with the group's middle count removed. Checked independently: each order's
    removal written out by the rewriter, weights compensated, run on the samples the pass
    measured on (the first 32 of those the statistics used)."""
    config = PruneConfig(flops=0.5, calibration=str(calibration), round_to=8)
    pipeline = Pipeline(default_passes(config))
    state = pipeline.until("sensitivity")(PruneState(config, graph=load_model(EXAMPLE)))
    analysis, constants = state.analysis, state.graph.constants
    context = ScoreContext(analysis, 0, state.statistics)
    obs_scores = pipeline.until("score")(PruneState(config, graph=load_model(EXAMPLE))).scores
    samples = state.calibration_data["input"][:32]
    reference = outputs(str(EXAMPLE), samples)
    constraints, joint = config.constraints(), get_criterion("obs_joint")
    kinds, alternatives = [], []
    for group in analysis.groups:
        if len(group.prunable) < 2 or not context.statistics_for(group):
            continue
        joint_scores = joint.score(group, context)
        orders = (_orders(obs_scores, group), sorted(group.prunable, key=lambda k: (joint_scores[k], k)))
        chosen = _orders(state.scores, group)
        assert chosen in orders, group.name
        if orders[0] == orders[1]:
            continue
        alternatives.append(chosen == orders[1])
        counts = MeasureSensitivity()._counts(group, len(group.prunable), 0.1, constraints.rounding_for(len(group.units)))
        errors = []
        for order in orders:
            removed = removed_indices(analysis, {group.id: order[:counts[len(counts) // 2]]})
            compensated = {}
            for stats in state.statistics.values():
                channels = removed.get(analysis.axis_id(stats.layer.weight, stats.layer.axis))
                if channels is not None:
                    compensated.update(compensate_layer(stats, constants, channels))
            errors.append(float(np.sum((outputs(rewrite_model(analysis, removed, compensated), samples) - reference) ** 2)))
        if abs(errors[0] - errors[1]) > 0.01 * max(errors):
            assert chosen == orders[int(errors[1] < errors[0])], (group.name, errors)
            kinds.append(int(errors[1] < errors[0]))
    assert len(kinds) >= 3, kinds
    assert state.order_choice.startswith(f"{sum(alternatives)} of {len(alternatives)} groups in obs_joint's order")


def test_sensitivity_samples_follow_the_output_size():
    assert samples_for(1000, available=128) == 32  # a classifier: as many as allowed
    assert samples_for(1 * 320 * 320, available=128) == 8  # a detector's score map: the least
    assert samples_for(32 * 384, available=128) == 22  # token embeddings: 2**18 values
    assert samples_for(1000, available=5) == 5


def test_refit_layer_is_the_ridge_least_squares_solution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 6))
    x_pruned = x[:, [0, 2, 3, 4, 5]] + 0.1 * rng.standard_normal((4000, 5))  # channel 1 gone, others perturbed
    weights = np.hstack([rng.standard_normal((3, 6)), rng.standard_normal((3, 1))])  # bias last
    layer = ConsumerLayer("n", "Gemm", "x", "W", 1, 1, "B")
    ones = np.ones((4000, 1))
    stats = PairedStatistics.empty(layer, 5, 6)
    stats.add(x_pruned[:2000], x[:2000], fold=0)
    stats.add(x_pruned[2000:], x[2000:], fold=1)
    present = weights + 0.5 * rng.standard_normal(weights.shape)
    matrix, bias, _ = refit_layer(layer, weights, present, stats, np.array([1]), ridge=0.01)

    # min ‖X̃ W̃ᵀ − X Wᵀ‖² + λ‖W̃ − P‖² over the weights (not the bias), as one stacked least-squares problem
    design = np.hstack([x_pruned, ones])
    target = np.hstack([x, ones]) @ weights.T
    lam = 0.01 * np.mean(np.diag(design.T @ design))
    prior = present[:, [0, 2, 3, 4, 5, 6]]
    stacked = np.vstack([design, np.sqrt(lam) * np.eye(6)[:5]])  # the bias is not pulled
    expected = np.linalg.lstsq(stacked, np.vstack([target, np.sqrt(lam) * prior.T[:5]]), rcond=None)[0].T
    # the statistics' products are float32: agreement to ~1e-6 relative
    np.testing.assert_allclose(matrix[:, [0, 2, 3, 4, 5]], expected[:, :5], rtol=2e-5)
    np.testing.assert_allclose(bias, expected[:, 5], rtol=2e-5, atol=1e-6)
    assert np.all(matrix[:, 1] == 0)

    # on synthetic rows a layer moves part of the way: P + t (W̃ − P)
    partial, partial_bias, _ = refit_layer(layer, weights, present, stats, np.array([1]), ridge=0.01, trust=0.5)
    kept = [0, 2, 3, 4, 5]
    np.testing.assert_allclose(partial[:, kept], (present[:, kept] + matrix[:, kept]) / 2, rtol=1e-12)
    np.testing.assert_allclose(partial_bias, (present[:, 6] + bias) / 2, rtol=1e-12)


def test_refit_ridge_is_chosen_on_held_out_rows():
    """Many rows of a clear linear relation: a weak ridge wins. Present weights that are already
    the best (the removed inputs are independent of the kept ones) and a few rows: any re-fit
    would fit the removed inputs' noise, and the present weights are kept."""
    rng = np.random.default_rng(1)
    layer = ConsumerLayer("n", "Gemm", "x", "W", 1, 1, "B")
    weights = np.hstack([rng.standard_normal((4, 8)), rng.standard_normal((4, 1))])
    present = weights + 0.3 * rng.standard_normal(weights.shape)

    def paired(x: np.ndarray, x_pruned: np.ndarray) -> PairedStatistics:
        stats = PairedStatistics.empty(layer, 6, 8)
        half = len(x) // 2
        stats.add(x_pruned[:half], x[:half], fold=0)
        stats.add(x_pruned[half:], x[half:], fold=1)
        return stats

    x = rng.standard_normal((4000, 8))
    informative = paired(x, x[:, 2:] + 0.01 * rng.standard_normal((4000, 6)))
    assert refit_layer(layer, weights, present, informative, np.array([0, 1]))[2] <= 0.01
    x = rng.standard_normal((16, 8))
    present = weights
    matrix, bias, ridge = refit_layer(layer, weights, present, paired(x, x[:, 2:]), np.array([0, 1]))
    assert ridge == "unchanged"
    np.testing.assert_array_equal(matrix[:, 2:], present[:, 2:8])
    np.testing.assert_array_equal(bias, present[:, 8])
    shifted = paired(x, x[:, 2:] + 1.0)  # every kept input off by one: only the bias needs re-fitting
    matrix, bias, ridge = refit_layer(layer, weights, present, shifted, np.array([0, 1]))
    assert ridge == "bias only"
    residual = x @ weights[:, :8].T - (x[:, 2:] + 1.0) @ present[:, 2:8].T  # W x − P x̃, biases equal
    np.testing.assert_allclose(bias, present[:, 8] + residual.mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(matrix[:, 2:], present[:, 2:8])


def test_refit_feature_scales_undo_a_per_feature_gain():
    """Kept inputs that arrive scaled by a gain per feature (and the removed ones without
    effect): one scale per feature restores the original outputs exactly, and with few rows
    the held-out choice prefers it to a full re-fit."""
    rng = np.random.default_rng(2)
    layer = ConsumerLayer("n", "Gemm", "x", "W", 1, 1, "B")
    weights = np.hstack([rng.standard_normal((5, 12)), rng.standard_normal((5, 1))])
    weights[:, :2] = 0.0  # the removed inputs had no effect
    gains = rng.uniform(0.5, 2.0, 10)
    x = rng.standard_normal((24, 12))
    stats = PairedStatistics.empty(layer, 10, 12)
    stats.add(x[:12, 2:] * gains, x[:12], fold=0)
    stats.add(x[12:, 2:] * gains, x[12:], fold=1)
    matrix, bias, ridge = refit_layer(layer, weights, weights, stats, np.array([0, 1]), ridge="scales")
    # exact but for the pull toward a = 1 (SCALE_RIDGE = 0.001) and float32 products: 0.5%
    np.testing.assert_allclose(matrix[:, 2:] * gains, weights[:, 2:12], rtol=5e-3)
    np.testing.assert_allclose(bias, weights[:, 12], atol=1e-2)
    assert refit_layer(layer, weights, weights, stats, np.array([0, 1]))[2] == "scales"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(path, input=rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
    return path


def outputs(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def test_refit_brings_outputs_closer_to_the_original(calibration):
    x = np.load(calibration)["input"]
    reference = outputs(str(EXAMPLE), x)
    errors = {}
    for rounds in (0, 1):
        config = PruneConfig(flops=0.4, calibration=str(calibration), allocation="score", criterion="l2",
                             refit_rounds=rounds, round_to=8)
        state = Pipeline(default_passes(config))(PruneState(config, graph=load_model(EXAMPLE)))
        errors[rounds] = float(np.linalg.norm(outputs(state.model, x) - reference) / np.linalg.norm(reference))
    assert errors[0] > 0.3 and errors[1] < 0.1 * errors[0], errors  # measured 0.443 and 0.024


def test_refit_stages_read_every_calibration_sample(calibration, monkeypatch):
    """Rows from many samples vary as the data does: within the budget (a small model's runs are
    far within it) every stage reads every calibration sample that is not held out, not the
    ``SAMPLES`` its rows per feature would need."""
    from spa_compiler.paired import PairedRunner
    from spa_compiler.refit import SAMPLES

    seen: list[int] = []
    statistics = PairedRunner.statistics

    def recording(self, layers, data, weights):
        seen.append(len(next(iter(data.values()))))
        return statistics(self, layers, data, weights)

    monkeypatch.setattr(PairedRunner, "statistics", recording)
    config = PruneConfig(flops=0.5, calibration=str(calibration), round_to=8)
    state = Pipeline(default_passes(config))(PruneState(config, graph=load_model(EXAMPLE)))
    available = len(next(iter(state.calibration_data.values())))
    assert available > 4 * SAMPLES and len(seen) >= 2 and set(seen) == {available}, (available, seen)


def test_data_free_refit_moves_part_of_the_way(calibration, monkeypatch):
    """Data-free, every layer's re-fit moves SYNTHETIC_TRUST of the way from its compensated
    weights (refit_layer's trust; its maths is tested above); with --calib the whole step."""
    import spa_compiler.refit as refit

    assert refit.SYNTHETIC_TRUST == 0.5
    trusts: list[float] = []
    fitted = refit.refit_layer

    def recording(*args, **kwargs):
        trusts.append(kwargs["trust"])
        return fitted(*args, **kwargs)

    monkeypatch.setattr(refit, "refit_layer", recording)
    seen = {}
    for name, data in (("data-free", None), ("calibrated", str(calibration))):
        trusts.clear()
        config = PruneConfig(flops=0.5, criterion="obs", round_to=8, calibration=data)
        Pipeline(default_passes(config))(PruneState(config, graph=load_model(EXAMPLE)))
        seen[name] = (len(trusts), set(trusts))
    assert seen["data-free"][1] == {0.5} and seen["calibrated"][1] == {1.0}, seen
    assert seen["data-free"][0] >= 5 and seen["calibrated"][0] >= 5, seen  # every re-fitted layer


def test_sensitivity_scores_add_up_to_the_measured_distortion(calibration):
    config = PruneConfig(flops=0.5, calibration=str(calibration), criterion="l2", refit_rounds=0, round_to=8)
    pipeline = Pipeline(default_passes(config))
    assert pipeline.names[:5] == ["analyse", "calibrate", "rotate", "score", "sensitivity"]
    before = pipeline.until("score")(PruneState(config, graph=load_model(EXAMPLE)))
    l2_scores = dict(before.scores)
    state = pipeline.until("sensitivity")(PruneState(config, graph=load_model(EXAMPLE)))
    assert state.cost_exponent == 1.0
    group = max((g for g in state.analysis.groups if g.prunable), key=lambda g: len(g.units))
    order = sorted(group.prunable, key=lambda k: (l2_scores[group.id][k], k))
    most = len(group.units) - max(1, int(np.ceil(0.1 * len(group.units))))
    most -= most % config.constraints().rounding_for(len(group.units))
    predicted = float(np.sum(state.scores[group.id][order[:most]]))

    # the same removal by zeroing what reads those channels, without compensation or the
    # pass's machinery; compensation makes the pass's distortion lower or equal
    graph = load_model(EXAMPLE)
    consumer_axes = set(state.analysis.tags["consumer"])
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    for axis, channels in removed_indices(state.analysis, {group.id: order[:most]}).items():
        if axis in consumer_axes:
            ref = state.analysis.axes[axis]
            tensor = next(t for t in model.graph.initializer if t.name == ref.tensor)
            value = onnx.numpy_helper.to_array(tensor).copy()
            np.moveaxis(value, ref.axis, 0)[channels] = 0
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, ref.tensor))
    x = state.calibration_data["input"][:32]
    reference, zeroed = outputs(graph.model, x), outputs(model, x)
    uncompensated = float(np.sum((zeroed - reference) ** 2) / np.sum(reference ** 2))
    assert 0 < predicted <= uncompensated * 1.0001


def test_split_held_out():
    data = {"x": np.arange(100)[:, None]}
    fit, held = split_held_out(data)
    assert len(fit["x"]) == 88 and held["x"][:, 0].tolist() == list(range(88, 100))
    assert split_held_out({"x": np.arange(15)[:, None]})[1] is None
    assert len(split_held_out({"x": np.arange(1000)[:, None]})[1]["x"]) == 32


def test_held_out_fidelity_and_eval(tmp_path, calibration):
    script = tmp_path / "metric.py"
    script.write_text(
        "import numpy as np, onnxruntime as ort\n"
        "def score(path):\n"
        "    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)\n"
        "    return float(s.run(None, {'input': x})[0].max())\n"
    )
    out = tmp_path / "small.onnx"
    report = prune(EXAMPLE, out, PruneConfig(flops=0.5, calibration=str(calibration), bench_runs=0,
                                            evaluation=str(script)))
    held = report.held_out_fidelity
    assert held.samples == 8 and held.source == "8 held-out calibration samples"
    x = np.load(calibration)["input"][56:]
    before, after = outputs(str(EXAMPLE), x), outputs(str(out), x)
    assert held.top1_agreement == pytest.approx(np.mean(before.argmax(1) == after.argmax(1)))
    cosines = np.sum(before * after, 1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
    assert held.cosine == pytest.approx(float(cosines.mean()), rel=1e-5)
    namespace: dict = {}
    exec(script.read_text(), namespace)
    assert report.eval_before == pytest.approx(namespace["score"](str(EXAMPLE)))
    assert report.eval_after == pytest.approx(namespace["score"](str(out)))
    assert "held out" in report.calibration


@pytest.mark.parametrize("fails_on", ["original", "pruned"])
def test_an_eval_script_that_fails_leaves_no_silent_output(tmp_path, fails_on):
    """A score() that fails on the input model stops the run before anything is pruned or
    written (the script is called once); one that fails only on the pruned model leaves that
    verified model written and the error says where."""
    calls = tmp_path / "calls.txt"
    failing = "True" if fails_on == "original" else "path.endswith('small.onnx')"
    script = tmp_path / "metric.py"
    script.write_text(
        "def score(path):\n"
        f"    with open({str(calls)!r}, 'a') as calls:\n"
        "        calls.write(path + '\\n')\n"
        f"    if {failing}:\n"
        "        raise RuntimeError('no labels here')\n"
        "    return 1.0\n"
    )
    out = tmp_path / "small.onnx"
    with pytest.raises(InputError) as error:
        prune(EXAMPLE, out, PruneConfig(flops=0.5, criterion="l2", allocation="score", refit_rounds=0,
                                        bench_runs=0, evaluation=str(script)))
    assert f"score() failed on the {fails_on} model (RuntimeError: no labels here)" in str(error.value)
    scored_paths = calls.read_text().split()
    if fails_on == "original":
        assert scored_paths == [str(EXAMPLE)] and not out.exists()
    else:
        assert scored_paths == [str(EXAMPLE), str(out)] and f"the pruned model is written to {out}" in str(error.value)
        assert len(outputs(str(out), np.zeros((1, 3, 32, 32), np.float32))) == 1


def test_data_free_fidelity_is_measured_on_unseen_synthetic_samples(tmp_path):
    """Data-free, the report also compares outputs on 16 synthetic samples made like the
    statistics' (another seed), compared batch by batch as on the whole set at once."""
    from spa_compiler.synthetic import synthetic_calibration
    from spa_compiler.verify import FidelitySums, fidelity

    out = tmp_path / "small.onnx"
    report = prune(EXAMPLE, out, PruneConfig(flops=0.5, bench_runs=0, seed=3))
    held = report.held_out_fidelity
    assert held.samples == 16 and held.source == "16 synthetic samples the statistics did not see"
    x = synthetic_calibration(load_model(EXAMPLE), 16, seed=4)[0]["input"]
    before, after = outputs(str(EXAMPLE), x), outputs(str(out), x)
    whole = fidelity([before], [after])
    assert held.cosine == pytest.approx(whole.cosine, rel=1e-5) and held.cosine < 1 - 1e-6
    assert held.top1_agreement == pytest.approx(np.mean(before.argmax(1) == after.argmax(1)))
    sums = FidelitySums()
    for part in (slice(0, 5), slice(5, 16)):
        sums.add([before[part]], [after[part]])
    halves = sums.result("x")
    assert (halves.cosine, halves.relative_error, halves.max_abs_error, halves.top1_agreement, halves.samples) == \
        pytest.approx((whole.cosine, whole.relative_error, whole.max_abs_error, whole.top1_agreement, 16), rel=1e-12)
    assert synthetic_only(report)


@pytest.mark.accurate
def test_a_single_calibration_sample_prunes_without_a_refit_choice(tmp_path, calibration):
    """One sample leaves a held-out fold without rows: the re-fit keeps the compensated weights
    rather than choosing on nothing, and the model is written and verified."""
    one = tmp_path / "one.npz"
    np.savez(one, input=np.load(calibration)["input"][:1])
    report = prune(EXAMPLE, tmp_path / "o.onnx", PruneConfig(flops=0.5, calibration=str(one), bench_runs=0))
    assert 0.45 <= report.flops_ratio <= 0.5
    assert report.fidelity.cosine > 0.99  # 0.999 when written


def test_eval_script_errors_are_input_errors(tmp_path):
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(InputError, match="defines no function score"):
        prune(EXAMPLE, tmp_path / "o.onnx", PruneConfig(flops=0.5, evaluation=str(tmp_path / "bad.py")))
    (tmp_path / "notes.txt").write_text("def score(path): return 1.0\n")
    with pytest.raises(InputError, match=r"is not a Python file \(\.py\)"):
        prune(EXAMPLE, tmp_path / "o.onnx", PruneConfig(flops=0.5, evaluation=str(tmp_path / "notes.txt")))
    assert not (tmp_path / "o.onnx").exists()


def test_fidelity_warning_says_what_to_do():
    from spa_compiler.report import PruneReport
    from spa_compiler.verify import Fidelity

    def report(cosine, agreement, calibration):
        return PruneReport("in", "out", "l2", "flops", 0.5, "global", 16, 1, 1, 1, 1, 1, 1, [], [],
                           fidelity=Fidelity(0.1, 0.1, cosine, agreement), calibration=calibration)

    assert fidelity_warning(report(0.99, 0.95, "data-free: ...")) is None
    warning = fidelity_warning(report(0.95, 0.6, "data-free: ..."))
    assert "--calib" in warning and "milder target" in warning
    assert warning.endswith("spa-prune distill out --teacher in --data TRAIN.npz")
    assert "--calib" not in fidelity_warning(report(0.5, None, "64 samples from c.npz"))
    shipped = report(0.8, None, "data-free, 512 English sentences that ship with spa-prune, ...")
    shipped.shipped_text = True  # they serve distillation too: no --data in the command
    assert fidelity_warning(shipped).endswith("spa-prune distill out --teacher in")
    shipped.input_shapes = {"input_ids": (1, 32), "attention mask": (1, 32)}  # as --input-shape bound them
    assert fidelity_warning(shipped).endswith(
        "spa-prune distill out --teacher in --input-shape input_ids=1x32 --input-shape 'attention mask=1x32'")
    assert synthetic_only(report(0.99, 0.95, "data-free: ..."))
    measured = report(0.99, 0.95, "112 samples from c.npz (16 more held out to measure fidelity)")
    measured.held_out_fidelity = Fidelity(0.1, 0.1, 0.97, None)
    assert not synthetic_only(measured)


def test_padding_rows_count_for_nothing():
    """Statistics take rows at real tokens only; outputs at padding are zeroed before comparing."""
    from spa_compiler.feature_rows import sample_rows
    from spa_compiler.token_mask import attention_mask, padding_zeroed, real_rows

    feeds = {"input_ids": np.arange(8).reshape(2, 4), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    mask = attention_mask(feeds)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert attention_mask({"attention_mask": np.ones((2, 4), np.float32)}) is None  # an additive float mask is no padding mask
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_array_equal(np.flatnonzero(real_rows(x.shape, -1, mask)), [0, 1, 2, 4, 5])
    assert real_rows(x.transpose(0, 2, 1).shape, 1, mask) is None  # channels first: not laid out by tokens
    layer = ConsumerLayer("n", "MatMul", "x", "W", 0, 1, None, channel_axis=-1)
    rows = sample_rows(layer, None, x.shape, np.random.default_rng(0), 3, mask)
    assert len(rows) == 3 and set(rows) <= {0, 1, 2, 4, 5}
    np.testing.assert_array_equal(sample_rows(layer, None, x.shape, np.random.default_rng(0), 100, mask), [0, 1, 2, 4, 5])
    zeroed = padding_zeroed(x, mask)
    assert zeroed[0, 3].tolist() == [0, 0, 0] and zeroed[1, 2:].sum() == 0
    np.testing.assert_array_equal(zeroed[0, :3], x[0, :3])
    other = x[:, :, 0].T  # [4, 2]: not led by the mask's shape
    assert padding_zeroed(other, mask) is other


def test_refit_stages_merge_consecutive_levels():
    from spa_compiler.refit import stages

    levels = [[f"l{i}a", f"l{i}b"] if i % 3 == 0 else [f"l{i}"] for i in range(27)]
    merged = stages(levels, 8)
    assert len(merged) == 8
    assert [layer for stage in merged for layer in stage] == [layer for level in levels for layer in level]
    assert {len(stage) for stage in merged} <= {3, 4, 5, 6}  # 27 levels in runs of 3 or 4
    assert stages(levels[:5], 8) == levels[:5]  # fewer levels than stages: one level each


def test_refit_keeps_a_layer_whose_statistics_overflowed():
    """Rows beyond float32's square root fold in by float64; a layer whose sums are still not
    finite keeps its present weights instead of taking NaNs."""
    layer = ConsumerLayer("n", "Gemm", "x", "W", 1, 1, "B")
    rows = np.random.default_rng(0).standard_normal((64, 3)) * 1e21
    stats = PairedStatistics.empty(layer, 3, 3)
    stats.add(rows[:32], rows[:32], fold=0)
    stats.add(rows[32:], rows[32:], fold=1)
    assert np.isfinite(stats.gram).all()
    np.testing.assert_allclose(stats.gram.sum(0)[:3, :3], rows.T @ rows, rtol=1e-6)
    stats.gram[0, 0, 0] = np.inf
    present = np.arange(8, dtype=float).reshape(2, 4)
    matrix, bias, ridge = refit_layer(layer, present, present, stats, np.array([], dtype=int))
    assert ridge == "unchanged"
    np.testing.assert_array_equal(matrix, present[:, :3])
    np.testing.assert_array_equal(bias, present[:, 3])


def test_fidelity_of_non_finite_outputs_is_not_perfect():
    from spa_compiler.verify import fidelity

    before = [np.ones((2, 4))]
    after = [np.array([[1.0, 1.0, 1.0, 1.0], [np.nan, 1.0, 1.0, 1.0]])]
    assert np.isnan(fidelity(before, after).cosine)
    assert fidelity(before, [np.ones((2, 4))]).cosine == 1.0
    assert fidelity([np.zeros((2, 4))], [np.zeros((2, 4))]).cosine == 1.0  # 0/0: nothing changed


def test_overflowing_pruned_model_is_not_written(tmp_path, monkeypatch):
    """A pruned model whose outputs are infinite where the original's are finite fails
    verification with one line, and nothing is written."""
    from spa_compiler import VerificationError
    from spa_compiler import rewrite as rewriting
    from spa_compiler import stages

    def overflowing(analysis, removed_by_axis, replaced=None):
        model = rewriting.rewrite_model(analysis, removed_by_axis, replaced)
        weight = model.graph.initializer[0]
        weight.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(weight).shape, 3e38,
                                                             dtype=np.float32), weight.name))
        return model

    monkeypatch.setattr(stages, "rewrite_model", overflowing)
    with pytest.raises(VerificationError, match=r"output '.*' is not finite .* nothing was written"):
        prune(EXAMPLE, tmp_path / "o.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.real_model
def test_ir3_model_through_sensitivity_and_refit():
    """Before IR version 4 every initializer is also a graph input, which onnxruntime takes as a
    constant: the runs that feed new weights (sensitivity, re-fit) still take them."""
    from helpers import randomize_weights
    from models.shipped import onnx_light_model_paths
    from spa_compiler import prune_graph
    from spa_compiler.rewrite import rewrite_model

    graph = randomize_weights(load_model(onnx_light_model_paths()["squeezenet"]), seed=1)
    assert graph.model.ir_version == 3
    state = prune_graph(graph, PruneConfig(flops=0.5, bench_runs=0, calibration_samples=16))
    assert {"sensitivity", "refit", "verify"} <= set(state.timings)
    assert 0.45 <= state.plan.achieved <= 0.52
    assert state.fidelity.cosine > 0.9
    pruned = rewrite_model(state.analysis, state.removed_by_axis, state.compensated)
    assert pruned.ir_version == 3
    assert {t.name for t in pruned.graph.initializer} <= {i.name for i in pruned.graph.input}


def test_layers_too_wide_for_statistics_are_scored_by_magnitude(tmp_path, monkeypatch):
    """A layer reading more than MAX_FEATURES features (VGG's classifier reads 25,088: H would
    take 5 GB) gets no statistics; the report names it and its channels are scored by L2."""
    from spa_compiler import stages

    monkeypatch.setattr(stages, "MAX_FEATURES", 100)
    report = prune(EXAMPLE, tmp_path / "o.onnx", PruneConfig(flops=0.5, bench_runs=0, calibration_samples=8))
    graph = load_model(EXAMPLE)
    wide = [layer.node for layer in stages.consumer_layers(stages.analyze_graph(graph)) if layer.features(graph) > 100]
    assert wide and f"none for {len(wide)} layers reading over 100 features" in report.calibration
    assert 0.45 <= report.flops_ratio <= 0.52
    assert report.fidelity.cosine > 0.99  # 0.999 when written


def test_layers_too_wide_to_refit_keep_their_compensated_weights(monkeypatch):
    """With every layer over the re-fit's width limit, the re-fit changes nothing."""
    from spa_compiler import refit

    def compensated(rounds):
        config = PruneConfig(flops=0.5, bench_runs=0, calibration_samples=32, refit_rounds=rounds, verify=False)
        return Pipeline(default_passes(config))(PruneState(config, graph=load_model(EXAMPLE))).compensated

    monkeypatch.setattr(refit, "MAX_FEATURES", 0)
    without, capped = compensated(0), compensated(1)
    assert without and sorted(without) == sorted(capped)
    assert all(np.array_equal(without[name], capped[name]) for name in without)
    monkeypatch.setattr(refit, "MAX_FEATURES", 10**6)
    refitted = compensated(1)
    assert set(refitted) - set(without)  # layers that lost no input channels re-fitted too


def test_top1_agreement_counts_decisions_only(tmp_path):
    """Top-1 agreement is measured on outputs that hold decisions: class scores along the last
    axis (a 2-D output, logits of a linear layer, a softmax along the last axis, those logits
    reshaped with their last axis whole) and a Sigmoid's ``[samples, K]`` probabilities (each
    one's side of 0.5), never on hidden states, maps or logits regrouped."""
    from onnx import TensorProto, helper, numpy_helper

    from spa_compiler.verify import ARG_MAX, LABEL, THRESHOLD, decision_outputs, fidelity

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])
    constants = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                 for name, shape in (("W", (8, 8)), ("b", (8,)), ("g", (8,)), ("W2", (40, 3)), ("W3", (40, 1)))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("Add", ["logits", "b"], ["biased"]),
        helper.make_node("Softmax", ["x"], ["probabilities"], axis=-1),
        helper.make_node("Softmax", ["x"], ["over_tokens"], axis=1),
        helper.make_node("LayerNormalization", ["x", "g"], ["hidden"], axis=-1),
        helper.make_node("Sigmoid", ["x"], ["map"]),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W2"], ["classes"]),
        helper.make_node("Gemm", ["flat", "W3"], ["score"]),
        helper.make_node("Sigmoid", ["score"], ["yes"]),
        helper.make_node("Reshape", ["biased", "per_position_shape"], ["per_position"]),
        helper.make_node("Reshape", ["biased", "regrouped_shape"], ["regrouped"]),
        helper.make_node("ArgMax", ["classes"], ["label"], axis=1, keepdims=0),
    ]
    constants += [numpy_helper.from_array(np.array(shape, dtype=np.int64), name)
                  for name, shape in (("per_position_shape", [2, 5, 1, 8]), ("regrouped_shape", [2, 10, 4]))]
    names = ["logits", "biased", "probabilities", "over_tokens", "hidden", "map", "classes", "yes", "per_position",
             "regrouped"]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    outputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, None))
    names.append("label")
    graph = helper.make_graph(nodes, "outputs", [x], outputs, constants)
    path = tmp_path / "outputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    kinds = decision_outputs(load_model(path))
    assert dict(zip(names, kinds)) == {"logits": ARG_MAX, "biased": ARG_MAX, "probabilities": ARG_MAX,
                                       "over_tokens": None, "hidden": None, "map": None, "classes": ARG_MAX,
                                       "yes": THRESHOLD, "per_position": ARG_MAX, "regrouped": None, "label": LABEL}

    before = [rng.standard_normal((4, 5, 8)), rng.standard_normal((4, 5, 8))]
    after = [before[0], before[1][..., ::-1]]  # the first output's decisions all kept, the second's moved
    assert fidelity(before, after, decisions=[ARG_MAX, None]).top1_agreement == 1.0
    assert fidelity(before, after, decisions=[None, None]).top1_agreement is None
    probabilities = np.array([[0.9], [0.2], [0.6], [0.4]])  # one per sample: a cosine of 1 whatever they are
    moved = np.array([[0.7], [0.3], [0.4], [0.45]])
    binary = fidelity([probabilities], [moved], decisions=[THRESHOLD])
    assert binary.cosine == 1.0 and binary.top1_agreement == 0.75
    labels, relabelled = np.array([3, 1, 4, 1]), np.array([3, 1, 5, 9])  # names, not quantities
    labelled = fidelity([probabilities, labels], [probabilities, relabelled], decisions=[None, LABEL])
    assert labelled.cosine == 1.0 and labelled.relative_error == 0.0 and labelled.top1_agreement == 0.5
    assert fidelity([labels], [relabelled]).top1_agreement == 0.5  # integers are labels without a graph too
    assert fidelity(before, after).top1_agreement < 1.0  # without a graph: every output of rank 2 or more


@pytest.mark.accurate
def test_allocation_to_given_widths_and_refit_on_other_samples():
    """``models.minilm_diagnosis``' passes. ``KeepCounts`` in place of the allocation removes the
    given number of units per group, lowest ranked first (the allocation's own counts give its
    plan back). ``ReplaceSamples`` after the compensation hands the re-fit other samples: the
    run's own give its weights back exactly, others (the same inputs halved) other weights."""
    from models.minilm_diagnosis import KeepCounts, ReplaceSamples

    config = PruneConfig(flops=0.5, bench_runs=0)

    def run(pipeline: Pipeline) -> PruneState:
        return pipeline(PruneState(config, graph=load_model(EXAMPLE)))

    passes = Pipeline(default_passes(config)).until("refit")
    allocated = run(passes)
    counts = {gid: len(units) for gid, units in allocated.plan.removed.items()}
    assert sum(counts.values()) >= 8
    kept = run(passes.replace("allocate", KeepCounts(counts)))
    assert {gid: sorted(units) for gid, units in kept.plan.removed.items()} == {
        gid: sorted(units) for gid, units in allocated.plan.removed.items()}
    halves = {gid: count // 2 for gid, count in counts.items()}
    half = run(passes.until("allocate").replace("allocate", KeepCounts(halves)))
    groups = {group.id: group for group in half.analysis.groups}
    for gid, count in halves.items():
        assert half.plan.removed[gid] == groups[gid].ranked(half.scores[gid])[:count]

    own = run(passes.insert_after("compensate", ReplaceSamples(allocated.calibration_data)))
    assert own.compensated.keys() == allocated.compensated.keys() and allocated.compensated
    for name, value in allocated.compensated.items():
        np.testing.assert_array_equal(own.compensated[name], value)
    halved = {name: array * 0.5 for name, array in allocated.calibration_data.items()}
    other = run(passes.insert_after("compensate", ReplaceSamples(halved)))
    common = allocated.compensated.keys() & other.compensated.keys()
    assert len(common) >= 4
    assert max(float(np.abs(other.compensated[name] - allocated.compensated[name]).max()) for name in common) > 1e-3
