"""basic-pitch's note model (a Keras export reading a waveform ``[N, T, 1]``) on synthesised notes
of known pitch: the metric, the ground truth, and pruning it with and without calibration clips."""

from __future__ import annotations

import numpy as np
import pytest

from models.pitch_task import FRAMES, Clips, PitchTask, note_f1, synthesised_notes
from models.shipped import package_dir

needs_basic_pitch = pytest.mark.skipif(package_dir("basic_pitch") is None,
                                       reason="pip install --no-deps basic-pitch==0.4.0")


def test_note_f1_counts_only_scored_frames():
    sounding = np.zeros((1, FRAMES, 88), dtype=bool)
    sounding[0, 10:20, 40] = True  # one key for ten frames
    scored = np.ones((1, FRAMES), dtype=bool)
    scored[0, 10] = False  # its first frame is not scored
    active = sounding.copy()
    active[0, 10:12, 40] = False  # missed: frame 10 (not scored) and 11
    active[0, 30:33, 7] = True  # three frames of a wrong key
    clips = Clips(np.zeros((1, 1, 1), np.float32), sounding, scored)
    # 8 hits, 3 false, 1 missed: 16 / (16 + 4)
    assert note_f1(active, clips) == pytest.approx(0.8, abs=1e-12)


def test_synthesised_notes_mark_the_frames_their_keys_sound():
    clips = synthesised_notes(6, seed=5)
    assert clips.audio.shape == (6, 43844, 1) and clips.audio.dtype == np.float32
    peaks = np.abs(clips.audio).max(axis=(1, 2))
    assert np.all((peaks > 0.19) & (peaks < 0.81))
    keys = clips.sounding.any(axis=1).sum(axis=1)
    assert np.all((keys >= 1) & (keys <= 3))
    assert np.all(clips.sounding.any(axis=2).sum(axis=1) >= 0.4 * 86 - 2)  # every note lasts 0.4 s or more
    assert np.array_equal(clips.audio, synthesised_notes(6, seed=5).audio)


@needs_basic_pitch
def test_the_unpruned_model_hears_the_notes():
    """basic-pitch finds the keys of the synthesised notes: note F1 0.989 on the 100 test clips."""
    task = PitchTask(test_samples=30)
    assert task.evaluate(task.source()[0]) > 0.97


@pytest.mark.accurate
@needs_basic_pitch
def test_pruned_with_and_without_calibration_clips(tmp_path):
    """At half the FLOPs with 128 calibration clips the model keeps its note F1 within 0.03 (0.985
    of 0.989 on the 100 test clips). Data-free at three quarters, from 2048 clips of synthetic
    notes, it keeps it within 0.03 too (0.992 on the 100; 128 clips gave 0.784, steady sine tones
    0.702)."""
    from spa_compiler import PruneConfig, prune

    task = PitchTask(test_samples=40)
    source, shapes = task.source()
    unpruned = task.evaluate(source)
    calibration = task.calibration(tmp_path / "calib.npz", 128)
    calibrated = tmp_path / "calibrated.onnx"
    report = prune(source, calibrated, PruneConfig(flops=0.5, input_shapes=shapes, calibration=str(calibration)))
    assert report.flops_ratio <= 0.51
    assert task.evaluate(calibrated) >= unpruned - 0.03
    data_free = tmp_path / "data_free.onnx"
    report = prune(source, data_free, PruneConfig(flops=0.75, input_shapes=shapes))
    assert report.calibration.startswith("data-free, 2048 synthetic samples") and "notes (audio)" in report.calibration
    assert task.evaluate(data_free) >= unpruned - 0.03
