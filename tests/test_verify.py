"""Verification's fidelity when onnxruntime's graph optimisations change a model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from spa_compiler import PruneConfig, load_model
from spa_compiler.api import prune_graph
from spa_compiler.verify import run_model, verification_inputs
from tests.test_cli import make_model, tensor, weight


def transpose_into_vector_matmul():
    """x[1,4,6,4] -> Conv 1x1 (8) -> Transpose(last two) -> MatMul with a 1-D weight over the height
    -> Unsqueeze -> Conv 1x1 (2): the 8 middle channels are prunable. onnxruntime 1.23 to 1.32
    fuse the Transpose into the MatMul (FusedMatMul, transA) and compute another product."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
        helper.make_node("Transpose", ["c1"], ["t"], name="transpose", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["t", "v"], ["m"], name="matmul"),
        helper.make_node("Unsqueeze", ["m", "axis"], ["u"], name="unsqueeze"),
        helper.make_node("Conv", ["u", "W2"], ["y"], name="conv2"),
    ]
    constants = [weight("W1", 8, 4, 1, 1), weight("B1", 8), weight("v", 6), weight("W2", 2, 8, 1, 1),
                 numpy_helper.from_array(np.array([-1], np.int64), "axis")]
    return make_model(nodes, [tensor("x", [1, 4, 6, 4])], [tensor("y", [1, 2, 4, 1])], constants)


def _relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    a, b = (np.concatenate([np.asarray(x, np.float64).ravel() for x in xs]) for xs in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_fidelity_of_the_unoptimised_run_when_the_optimiser_changes_the_outputs(tmp_path):
    """The pruned model keeps the pattern; its optimised outputs are the optimiser's, so the
    fidelity is measured on its unoptimised run (both models run unoptimised here, independently
    of the library's fidelity code), and the change the optimiser makes is given."""
    model = transpose_into_vector_matmul()
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 4)).astype(np.float32)}
    if _relative(run_model(model, feeds, optimize=False), run_model(model, feeds)) < 1e-3:
        pytest.skip("this onnxruntime computes a Transpose into a MatMul with a 1-D weight as the graph says")
    onnx.save(model, tmp_path / "model.onnx")
    graph = load_model(tmp_path / "model.onnx")
    state = prune_graph(graph, PruneConfig(ratio=0.5, criterion="l2", allocation="score", refit_rounds=0, round_to=1))
    assert state.plan.n_removed == 4
    inputs, _ = verification_inputs(graph, state.config.seed)
    before = run_model(model, inputs, optimize=False)
    plain, optimised = run_model(state.model, inputs, optimize=False), run_model(state.model, inputs)
    fidelity = state.fidelity
    assert fidelity.optimiser_change == pytest.approx(_relative(plain, optimised), rel=1e-6)
    assert fidelity.optimiser_change > 0.1
    assert fidelity.relative_error == pytest.approx(_relative(before, plain), rel=1e-5)
    assert fidelity.relative_error < _relative(before, optimised)


def test_work_sessions_do_not_spin_and_timing_sessions_keep_the_default():
    """The pipeline's sessions (every core) give their threads back after a run; a timing
    session of a given thread count is left as a deployment would run it."""
    from spa_compiler.verify import session_for

    model = transpose_into_vector_matmul()
    key = "session.intra_op.allow_spinning"
    work = session_for(model).get_session_options()
    timing = session_for(model, threads=2).get_session_options()
    assert work.get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        timing.get_session_config_entry(key)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_samples_with_all_but_zero_outputs_in_both_models_do_not_count_toward_the_cosine():
    """A detector's map of a picture without text is round-off in both models: its cosine is
    noise. Four samples of 50 outputs (seeded): two with a signal (pruned = original + 5% noise),
    one all but zero in both (1e-6 of the signal's size, unrelated directions), one all but zero
    in the original only, where the pruned model fires (a false detection, which counts)."""
    from spa_compiler.verify import SILENT, fidelity

    rng = np.random.default_rng(0)
    signal = rng.standard_normal((2, 50))
    noisy = signal + 0.05 * rng.standard_normal((2, 50))
    quiet, quieter = 1e-6 * rng.standard_normal((2, 50)), 1e-6 * rng.standard_normal(50)
    fires = rng.standard_normal(50)
    before = np.vstack([signal, quiet[:1], quieter[None]])[:, None, :]  # one output [samples, 1, 50]
    after = np.vstack([noisy, quiet[1:], fires[None]])[:, None, :]
    f = fidelity([before], [after])
    counted = [_cosine(signal[0], noisy[0]), _cosine(signal[1], noisy[1]), _cosine(quieter, fires)]
    assert f.samples == 4 and f.counted == 3
    assert f.cosine == pytest.approx(np.mean(counted), rel=1e-12)
    assert f.scale == pytest.approx(max(np.linalg.norm(x) for x in [*signal, *noisy, fires]), rel=1e-12)
    assert np.linalg.norm(quiet, axis=1).max() < SILENT * f.scale
    assert abs(_cosine(quiet[0], quiet[1])) < 0.5  # what the plain mean would have taken in
    assert fidelity([before[:2]], [after[:2]]).counted is None  # every sample has a signal


def test_the_report_says_over_which_samples_and_when_a_figure_means_nothing():
    from spa_compiler.report import describe_fidelity
    from spa_compiler.verify import Fidelity

    held = Fidelity(0.5, 0.17, 0.9855, None, samples=16, source="16 held-out synthetic samples", counted=8, scale=256.0)
    noise = Fidelity(7e-4, 1.0, 0.0256, None, samples=1, source="standard-normal inputs", counted=0, scale=0.0017)
    assert describe_fidelity(held) == (
        "outputs vs original on 16 held-out synthetic samples: cosine 0.9855 over 8 of 16 samples (the other 8: "
        "outputs all but zero in both models), relative error 0.17")
    assert describe_fidelity(noise, held) == (
        "outputs vs original on standard-normal inputs not compared: both models' outputs are all but zero there "
        "(6.6e-06 of their size on 16 held-out synthetic samples)")
