"""Data-free audio: notes, the harmonic sounds that voices and instruments make.

A waveform input gets, per sample and channel, one to five notes over faint white noise. A note
has a fundamental ``f`` drawn log-uniformly from 60 Hz to 1 kHz (a voice's range and most of a
melody's, taking the samples at 16 kHz: at 22.05 or 44.1 kHz the same samples are higher), its
partials ``h f`` below the Nyquist frequency (at most ``MAX_PARTIALS``) with amplitudes
``h^-p``, ``p`` from 0.5 to 2.5 (bright to dull) and random phases, under an attack of 2 to
50 ms, an exponential decay of 0 to 6 per second and a 20 ms release; it starts anywhere from a
quarter of the clip before its beginning to its end and lasts a tenth of the clip to all of it.
The mix is scaled to a peak between 0.1 and 0.9, the noise 0.001 to 0.1 of it.

Why notes rather than steady sine tones: a model that finds pitches or words reads onsets,
decays and the comb of partials a voiced sound has; steady tones exercise none of them.
basic-pitch's note model (``models.pitch_task``, note F1 0.989 unpruned) pruned data-free by the
default pipeline to ``--flops 0.75`` kept 0.702 / 0.702 / 0.701 / 0.702 over seeds 0 to 3 from
128 clips of two to five steady sine tones in noise, and 0.784 / 0.991 / 0.993 / 0.743 from 128
clips of notes (at 0.5: 0.638 / 0.618 / 0.627 / 0.641 and 0.784 / 0.877 / 0.722 / 0.715). Those
128 were too few: which channels of its first contour convolution go was left to the draw.
Data-free runs make 2048 clips of notes (:data:`spa_compiler.config.SYNTHETIC_AUDIO_SAMPLES`):
0.992 / 0.994 / 0.994 / 0.993 at 0.75 and 0.917 / 0.925 / 0.940 / 0.935 at 0.5 (seeds 4 and 5
at 0.5: 0.714 and 0.733, keeping the contour convolution's channel 5 of 8 where the others keep
channel 1). Calibrated on 128 clips of its task's own kind it keeps 0.994 at 0.75 (0.985 at 0.5).

A note's waveform is one period of its partials, read at the note's phase: the cost is the
clip's length, whatever the number of partials. The period is a weighted sum of sine and cosine
tables of the partials that every note shares, and only the part of a note inside its clip is
made (2048 clips of two seconds in 7 s instead of 16).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["MIN_AUDIO_LENGTH", "audio_notes", "waveform_layout"]

MIN_AUDIO_LENGTH = 1000  # samples along the last axis of a float input taken for a waveform
RATE = 16000.0  # samples per second the frequencies assume
MAX_PARTIALS = 20
TABLE = 4096  # points per period of a note's waveform, interpolated (the 20th partial gets 200 a cycle)


def waveform_layout(shape: tuple[int, ...]) -> str | None:
    """"NT", "NCT" or "NTC" for a waveform-like shape (samples first; ``C`` 1 or 2, ``T`` at least
    ``MIN_AUDIO_LENGTH``), else None."""
    if len(shape) == 2 and shape[1] >= MIN_AUDIO_LENGTH:
        return "NT"
    if len(shape) == 3 and shape[2] >= MIN_AUDIO_LENGTH and shape[1] <= 2:
        return "NCT"
    if len(shape) == 3 and shape[1] >= MIN_AUDIO_LENGTH and shape[2] <= 2:  # channels last, as Keras has it
        return "NTC"
    return None


@functools.cache
def _partial_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One period's points ``c`` (``TABLE + 1`` of them, 0 to 1), and ``sin 2πhc``, ``cos 2πhc``
    for every partial ``h`` up to ``MAX_PARTIALS``: a note's period is their sum weighted by its
    amplitudes and phases."""
    cycle = np.arange(TABLE + 1) / TABLE
    angles = 2 * np.pi * np.arange(1, MAX_PARTIALS + 1)[:, None] * cycle
    return cycle, np.sin(angles), np.cos(angles)


def _note(rng: np.random.Generator, duration: int, first: int, last: int) -> np.ndarray:
    """Samples ``first`` to ``last`` (from the note's start) of one note lasting ``duration``
    samples, from its attack to its release (see the module docstring); the note's parameters
    are drawn whatever part is asked, so the draws that follow do not depend on it."""
    index = np.arange(first, max(first, last))
    t = index / RATE
    fundamental = np.exp(rng.uniform(np.log(60.0), np.log(1000.0)))
    partials = np.arange(1, min(MAX_PARTIALS, int(RATE / 2 / fundamental)) + 1)
    amplitudes = partials ** -rng.uniform(0.5, 2.5)
    phases = rng.uniform(0, 2 * np.pi, len(partials))
    cycle, sines, cosines = _partial_tables()
    count = len(partials)  # sin(a + φ) = sin a cos φ + cos a sin φ
    period = (amplitudes * np.cos(phases)) @ sines[:count] + (amplitudes * np.sin(phases)) @ cosines[:count]
    tone = np.interp((fundamental * t) % 1.0, cycle, period)
    attack = np.minimum(1.0, t / rng.uniform(0.002, 0.05))
    release = np.minimum(1.0, (duration - index) / (0.02 * RATE))
    return attack * np.exp(-t * rng.uniform(0.0, 6.0)) * release * tone


def audio_notes(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype = np.float64) -> np.ndarray:
    """Waveforms of ``shape`` (time along the last axis) made of notes (see the module docstring),
    each made in float64 and stored as ``dtype``."""
    length = shape[-1]
    waves = np.zeros((int(np.prod(shape[:-1])), length), dtype)
    for row in range(len(waves)):
        wave = np.zeros(length)
        for _ in range(rng.integers(1, 6)):
            start, duration = int(rng.integers(-length // 4, length)), max(1, int(rng.uniform(0.1, 1.0) * length))
            first, last = max(start, 0), min(length, start + duration)  # the part of the note inside the clip
            loudness = rng.uniform(0.2, 1.0)
            wave[first:max(first, last)] += loudness * _note(rng, duration, first - start, last - start)
        wave += rng.normal(0, rng.uniform(0.001, 0.1) * max(np.abs(wave).max(), 1e-3), length)
        wave *= rng.uniform(0.1, 0.9) / max(np.abs(wave).max(), 1e-9)
        waves[row] = wave
    return waves.reshape(shape)
