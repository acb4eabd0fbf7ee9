"""Accuracy tasks: the RivaGAN invisible watermark (encoder and decoder) on photographs.

invisible-watermark (``pip install --no-deps invisible-watermark==0.2.0``) ships RivaGAN's two
networks as ONNX (``imwatermark/rivagan_encoder.onnx``, ``rivagan_decoder.onnx``; PyTorch exports,
opset 10). Both read a frame ``[N, 3, 1, H, W]`` (3-D convolutions over one frame) in ``[-1, 1]``
(``x / 127.5 - 1``, the colours in the order ``cv2.imread`` gives, blue first); the encoder also
reads a 32-bit message ``[N, 32]`` of zeros and ones and writes a frame that looks the same and
carries the message; the decoder reads the message back, a bit being one where its output passes
0.52 (the package's threshold). The package asks for pictures of at least 256 by 256 pixels.

The pictures are 256-pixel crops of the three photographs that scikit-learn and matplotlib ship
(``china.jpg``, ``flower.jpg``, ``grace_hopper.jpg``), at random places and half of them mirrored:
test crops from the left half of each photograph, calibration crops from the right half (no
pixel in both), messages drawn at random (test seed 0, calibration seed 1). A watermarked
picture is written as the package writes it: clipped to ``[-1, 1]`` and truncated to 8 bits.

- ``watermark`` prunes the decoder. Metrics on the crops watermarked by the original encoder:
  **bit accuracy** (the share of message bits read right; 0.5 is chance) and **messages intact**
  (the share of crops whose 32 bits are all right).
- ``watermark_embed`` prunes the encoder. Metrics: **bit accuracy** of the original decoder on
  the pruned encoder's pictures, and their **PSNR** (dB) against the crops they came from (the
  original encoder's: about 42 dB); a watermark that reads well but shows is no better.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .shipped import package_dir, shipped_file
from .tasks import Shapes, Task, run_batched

__all__ = ["WatermarkDecodeTask", "WatermarkEmbedTask", "photo_crops", "messages", "watermarked", "bit_accuracy"]

SIDE = 256
BITS = 32
THRESHOLD = 0.52
TEST_SEED, CALIBRATION_SEED = 0, 1
PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
          ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))
_INSTALL_HINT = "pip install --no-deps invisible-watermark==0.2.0"


def _photo(package: str, name: str) -> np.ndarray:
    folder = package_dir(package)
    path = folder / name if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no photograph {name}: install {package}")
    return np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]  # blue first, as cv2.imread


def photo_crops(count: int, seed: int, right: bool) -> np.ndarray:
    """``count`` crops ``[count, 3, 1, SIDE, SIDE]`` in ``[-1, 1]`` from the left (or right) half of
    each photograph in turn, at places drawn with ``seed``, half of them mirrored."""
    rng = np.random.default_rng(seed)
    photos = [_photo(*photo) for photo in PHOTOS]
    crops = np.empty((count, 3, 1, SIDE, SIDE), np.float32)
    for k in range(count):
        photo = photos[k % len(photos)]
        half = photo.shape[1] // 2
        top, left = rng.integers(0, photo.shape[0] - SIDE + 1), rng.integers(0, half - SIDE + 1) + (half if right else 0)
        crop = photo[top : top + SIDE, left : left + SIDE]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops[k, :, 0] = crop.transpose(2, 0, 1) / 127.5 - 1
    return crops


def messages(count: int, seed: int) -> np.ndarray:
    """``count`` random ``BITS``-bit messages ``[count, BITS]`` of zeros and ones (float32), drawn
    with ``seed + 1000`` so that they share no draws with the crops of ``seed``."""
    return np.random.default_rng(seed + 1000).integers(0, 2, (count, BITS)).astype(np.float32)


def watermarked(encoder: str | Path, frames: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The pictures ``encoder`` writes carrying ``bits``, clipped and truncated to 8 bits as the
    package saves them, back in ``[-1, 1]``."""
    written = np.clip(run_batched(encoder, {"frame": frames, "data": bits}, batch=1), -1, 1)
    return (((written + 1) * 127.5).astype(np.uint8) / 127.5 - 1).astype(np.float32)


def bit_accuracy(decoder: str | Path, frames: np.ndarray, bits: np.ndarray) -> tuple[float, float]:
    """The share of ``bits`` that ``decoder`` reads right from ``frames``, and the share of
    frames whose message it reads whole."""
    right = (run_batched(decoder, {"frame": frames}, batch=1) > THRESHOLD) == (bits > 0.5)
    return float(right.mean()), float(right.all(axis=1).mean())


class _RivaGAN(Task):
    default_test_samples = 60
    round_to = 8  # 32 channels a layer

    def _model(self, part: str) -> Path:
        return shipped_file("imwatermark", f"rivagan_{part}.onnx", _INSTALL_HINT)

    @cached_property
    def test_frames(self) -> np.ndarray:
        return photo_crops(self.test_samples, TEST_SEED, right=False)

    @cached_property
    def test_bits(self) -> np.ndarray:
        return messages(self.test_samples, TEST_SEED)


class WatermarkDecodeTask(_RivaGAN):
    name = "watermark"
    metric_names = ("bit accuracy", "messages intact")

    @property
    def description(self) -> str:
        return f"RivaGAN watermark decoder, bits read from {self.test_samples} watermarked photograph crops"

    def source(self) -> tuple[Path, Shapes]:
        return self._model("decoder"), {"frame": (1, 3, 1, SIDE, SIDE)}

    @cached_property
    def test_inputs(self) -> np.ndarray:
        return watermarked(self._model("encoder"), self.test_frames, self.test_bits)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        frames = photo_crops(samples, CALIBRATION_SEED, right=True)
        return {"frame": watermarked(self._model("encoder"), frames, messages(samples, CALIBRATION_SEED))}

    def metrics(self, path: str | Path) -> dict[str, float]:
        bits, whole = bit_accuracy(path, self.test_inputs, self.test_bits)
        return {"bit accuracy": bits, "messages intact": whole}


class WatermarkEmbedTask(_RivaGAN):
    name = "watermark_embed"
    metric_names = ("bit accuracy", "PSNR")

    @property
    def description(self) -> str:
        return f"RivaGAN watermark encoder, bits its pictures carry and their PSNR on {self.test_samples} photograph crops"

    def source(self) -> tuple[Path, Shapes]:
        return self._model("encoder"), {"frame": (1, 3, 1, SIDE, SIDE), "data": (1, BITS)}

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"frame": photo_crops(samples, CALIBRATION_SEED, right=True), "data": messages(samples, CALIBRATION_SEED)}

    def metrics(self, path: str | Path) -> dict[str, float]:
        pictures = watermarked(path, self.test_frames, self.test_bits)
        bits, _ = bit_accuracy(self._model("decoder"), pictures, self.test_bits)
        error = np.mean((pictures.astype(np.float64) - self.test_frames) ** 2)
        return {"bit accuracy": bits, "PSNR": float(10 * np.log10(4 / max(error, 1e-12)))}
