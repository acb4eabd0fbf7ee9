"""magika's file-type classifier (a JAX model through TensorFlow): its channels are side by side
in a Reshape, its Slice bounds int32, and a re-fit on few files' rows would cost it its accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from models.filetype_task import FileTypeTask, magika_features
from models.shipped import package_dir

if package_dir("magika") is None:
    pytest.skip("pip install --no-deps magika==1.0.3", allow_module_level=True)


def test_features_are_magikas(tmp_path):
    """The head without its leading whitespace, padded after; the tail without its trailing
    whitespace, padded before; each from at most a block of the file."""
    config = {"beg_size": 6, "end_size": 6, "block_size": 16, "padding_token": 256}
    short = tmp_path / "short.txt"
    short.write_bytes(b"  \nab  ")
    assert magika_features(short, config).tolist() == [97, 98, 32, 32, 256, 256, 256, 32, 32, 10, 97, 98]
    long = tmp_path / "long.bin"
    long.write_bytes(bytes(range(1, 41)))  # 40 bytes: the head and tail blocks are 16 bytes each
    assert magika_features(long, config).tolist() == [1, 2, 3, 4, 5, 6, 35, 36, 37, 38, 39, 40]


@pytest.mark.accurate
def test_calibrated_three_quarters_keeps_the_accuracy(tmp_path):
    """Pruned to three quarters of its FLOPs (its 64 byte-embedding channels to 48) with 128
    calibration files (or all there are), it keeps at least 0.95 of its accuracy on the test
    files (0.977 to 1.0 of 0.862 over seeds 0 to 3, 8 files per type)."""
    from spa_compiler import PruneConfig, prune

    task = FileTypeTask(test_samples=8)
    files, labels = task.test_files
    assert len(files) >= 50 and {"python", "pythonbytecode", "txt"} <= set(labels)
    assert not set(files) & set(task.split[1])
    source, shapes = task.source()
    unpruned = task.evaluate(source)
    assert unpruned >= 0.75
    calibration = task.calibration(tmp_path / "calib.npz", 128)
    assert np.load(calibration)["bytes"].shape == (min(128, len(task.split[1])), 2048)
    report = prune(source, tmp_path / "small.onnx", PruneConfig(flops=0.75, input_shapes=shapes, round_to=task.round_to,
                                                                calibration=str(calibration), bench_runs=0))
    assert report.flops_ratio <= 0.76
    assert task.evaluate(tmp_path / "small.onnx") >= 0.95 * unpruned
