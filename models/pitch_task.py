"""Accuracy task: Spotify's basic-pitch note model on synthesised notes with known pitches.

basic-pitch (``pip install --no-deps basic-pitch==0.4.0``) ships its polyphonic transcription
model as ONNX (``saved_models/icassp_2022/nmp.onnx``, a Keras export): two seconds of mono
audio at 22,050 Hz (``[N, 43844, 1]``) in, a constant-Q transform and harmonic stacking computed
in the graph, then three small convolutional heads whose outputs are, per frame (86 a second,
172 in all), pitch-contour salience over 264 third-of-a-semitone bins, note activity and note
onsets over the 88 piano keys.

The clips are notes whose pitches and times are known: one to three per clip, MIDI pitches 40
to 84 (82 Hz to 1 kHz), each a harmonic tone (eleven partials below the Nyquist frequency,
amplitudes ``h^-p`` with ``p`` drawn from 0.7 to 2, random phases) under a 10 ms attack, an
exponential decay and a 20 ms release, starting between 0.05 and 0.8 s and lasting 0.4 to
1.1 s, the mix scaled to a peak between 0.2 and 0.8 over faint white noise. Test clips come
from seed 0, calibration clips from seed 1. Metric: **note F1**, frame by frame: a key counts as
sounding in a frame when the note output reaches 0.3 (basic-pitch's default frame threshold),
against the keys that do sound then; frames within 35 ms of a note's start or end are not
scored (a frame spans 93 ms of audio, so those are neither on nor off).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .shipped import shipped_file
from .tasks import Shapes, Task

__all__ = ["NOTE_OUTPUT", "Clips", "PitchTask", "note_f1", "synthesised_notes"]

SAMPLE_RATE = 22050
SAMPLES = 43844  # basic-pitch's AUDIO_N_SAMPLES: two seconds less one hop of 256
FRAMES = 172
FRAME_RATE = SAMPLE_RATE / 256
LOWEST_KEY = 21  # MIDI number of the first of the 88 keys
FRAME_THRESHOLD = 0.3
UNSCORED = 0.035  # seconds either side of a note's start and end
INPUT = "serving_default_input_2:0"
NOTE_OUTPUT = "StatefulPartitionedCall:1"
_INSTALL_HINT = "pip install --no-deps basic-pitch==0.4.0"


@dataclass(frozen=True)
class Clips:
    """Audio ``[n, SAMPLES, 1]``, the keys sounding per frame ``[n, FRAMES, 88]`` and the frames scored ``[n, FRAMES]``."""

    audio: np.ndarray
    sounding: np.ndarray
    scored: np.ndarray


def _tone(rng: np.random.Generator, frequency: float, length: int) -> np.ndarray:
    """One note of ``length`` samples (see the module docstring)."""
    t = np.arange(length) / SAMPLE_RATE
    partials = np.arange(1, 12)
    partials = partials[frequency * partials < SAMPLE_RATE / 2 - 500]
    phases = rng.uniform(0, 2 * np.pi, len(partials))
    amplitudes = partials ** -rng.uniform(0.7, 2.0)
    tone = (amplitudes[:, None] * np.sin(2 * np.pi * frequency * partials[:, None] * t + phases[:, None])).sum(0)
    release = np.minimum(1.0, (length - np.arange(length)) / (0.02 * SAMPLE_RATE))
    return np.minimum(1.0, t / 0.01) * np.exp(-t * rng.uniform(0.5, 3.0)) * release * tone


def synthesised_notes(count: int, seed: int) -> Clips:
    """``count`` clips of notes drawn with ``seed`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    frame_times = np.arange(FRAMES) / FRAME_RATE
    audio = np.empty((count, SAMPLES, 1), dtype=np.float32)
    sounding = np.zeros((count, FRAMES, 88), dtype=bool)
    scored = np.ones((count, FRAMES), dtype=bool)
    for k in range(count):
        mix = np.zeros(SAMPLES)
        for _ in range(rng.integers(1, 4)):
            key = int(rng.integers(40, 85))
            start = rng.uniform(0.05, 0.8)
            end = min(start + rng.uniform(0.4, 1.1), SAMPLES / SAMPLE_RATE)
            first, last = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
            mix[first:last] += rng.uniform(0.5, 1.0) * _tone(rng, 440.0 * 2 ** ((key - 69) / 12), last - first)
            sounding[k, (frame_times >= start) & (frame_times < end), key - LOWEST_KEY] = True
            for edge in (start, end):
                scored[k, np.abs(frame_times - edge) < UNSCORED] = False
        mix = mix / np.abs(mix).max() * rng.uniform(0.2, 0.8) + rng.normal(0, 1e-3, SAMPLES)
        audio[k, :, 0] = mix
    return Clips(audio, sounding, scored)


def note_f1(active: np.ndarray, clips: Clips) -> float:
    """Frame-level F1 of the keys ``active`` ``[n, FRAMES, 88]`` against ``clips.sounding`` on the scored frames."""
    scored = clips.scored[:, :, None]
    hits = np.sum(active & clips.sounding & scored)
    false = np.sum(active & ~clips.sounding & scored)
    missed = np.sum(~active & clips.sounding & scored)
    return float(2 * hits / max(2 * hits + false + missed, 1))


class PitchTask(Task):
    name = "pitch"
    metric_names = ("note F1",)
    default_test_samples = 100

    @property
    def description(self) -> str:
        return f"basic-pitch note model, frame-level note F1 on {self.test_samples} clips of synthesised notes"

    @cached_property
    def model_path(self) -> Path:
        return shipped_file("basic_pitch", "saved_models/icassp_2022/nmp.onnx", _INSTALL_HINT)

    def source(self) -> tuple[Path, Shapes]:
        return self.model_path, {INPUT: (1, SAMPLES, 1)}

    @cached_property
    def test_clips(self) -> Clips:
        return synthesised_notes(self.test_samples, seed=0)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {INPUT: synthesised_notes(samples, seed=1).audio}

    def metrics(self, path: str | Path) -> dict[str, float]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        clips = self.test_clips
        notes = np.concatenate([session.run([NOTE_OUTPUT], {INPUT: clips.audio[k : k + 1]})[0]
                                for k in range(len(clips.audio))])
        return {"note F1": note_f1(notes >= FRAME_THRESHOLD, clips)}
