"""RivaGAN's invisible watermark (3-D convolutions over one frame, ``[N, 3, 1, H, W]``) on crops of
photographs: the crops and messages, the unpruned networks' ground truth, and pruning them."""

from __future__ import annotations

import numpy as np
import pytest

from models.shipped import package_dir
from models.watermark_task import (
    BITS, SIDE, WatermarkDecodeTask, WatermarkEmbedTask, bit_accuracy, messages, photo_crops,
)

needs_imwatermark = pytest.mark.skipif(package_dir("imwatermark") is None,
                                       reason="pip install --no-deps invisible-watermark==0.2.0")


def test_crops_are_8_bit_pictures_from_either_half():
    left, right = photo_crops(6, seed=3, right=False), photo_crops(6, seed=3, right=True)
    assert left.shape == (6, 3, 1, SIDE, SIDE) and left.dtype == np.float32
    assert left.min() >= -1 and left.max() <= 1
    levels = (left + 1) * 127.5
    assert np.abs(levels - np.round(levels)).max() < 1e-3  # 8-bit values
    assert np.array_equal(left, photo_crops(6, seed=3, right=False))
    assert not np.array_equal(left, photo_crops(6, seed=4, right=False))
    # the same draws in the other half of each photograph: other pixels
    assert not np.allclose(left, right)


def test_messages_are_bits():
    bits = messages(100, seed=0)
    assert bits.shape == (100, BITS) and set(np.unique(bits)) == {0.0, 1.0}
    assert 0.45 < bits.mean() < 0.55
    assert not np.array_equal(bits, messages(100, seed=1))


@needs_imwatermark
def test_the_unpruned_networks_carry_the_message():
    """The decoder reads 0.994 of the bits the encoder wrote (60 test crops), and nothing from
    crops without a watermark; the watermark costs about 40 dB of PSNR."""
    decode, embed = WatermarkDecodeTask(test_samples=12), WatermarkEmbedTask(test_samples=12)
    assert decode.evaluate(decode.source()[0]) >= 0.98
    chance, _ = bit_accuracy(decode.source()[0], decode.test_frames, decode.test_bits)
    assert 0.35 < chance < 0.65
    metrics = embed.metrics(embed.source()[0])
    assert metrics["bit accuracy"] >= 0.98 and 38 < metrics["PSNR"] < 45


@pytest.mark.accurate
@needs_imwatermark
def test_decoder_pruned_data_free_on_single_frame_pictures(tmp_path):
    """The decoder's ``[N, 3, 1, H, W]`` input gets synthetic pictures. Pruned to 0.3 of its FLOPs
    from 32 of them at 128 pixels (kept small for time) it reads 0.989 of the bits and 16 of the
    20 messages whole (0.992 and 17 unpruned); standard-normal frames gave 0.978 and 11."""
    from spa_compiler import PruneConfig, prune

    task = WatermarkDecodeTask(test_samples=20)
    pruned = tmp_path / "decoder.onnx"
    report = prune(task.source()[0], pruned, PruneConfig(
        flops=0.3, input_shapes={"frame": (1, 3, 1, 128, 128)}, calibration_samples=32, bench_runs=0))
    assert report.flops_ratio <= 0.32
    assert "32 natural and text single-frame pictures" in report.calibration
    metrics = task.metrics(pruned)  # at the task's 256 pixels: the pruned file keeps the free axes
    assert metrics["bit accuracy"] >= 0.98 and metrics["messages intact"] >= 0.7
