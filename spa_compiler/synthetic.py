"""Data-free calibration inputs shaped like the modality each graph input expects.

Layer statistics are only as good as the activations they come from. Without calibration data,
each graph input is classified from the graph and filled accordingly:

- **image** (float, rank 4, 1, 3 or 4 channels first or last, both spatial sides >= 8): synthetic
  pictures ``z`` in ``[0, 1]`` of two families, *natural* (1/f "pink" noise, whose power
  spectrum ``1/f²`` is that of photographs, under occluding rectangles, ellipses and strokes,
  near-grey colours) and *text* (lines of English words in glyphs that ship with spa-prune, dark
  on a light textured page, half of them upside down: :mod:`.rendered_text`), then mapped into
  the model's range by ``x = a z + b`` (see below). An 8-bit input (``uint8``, the same
  shapes) takes raw pixel values, which the model scales itself: ``x = round(255 z)``, and the
  BatchNorms still choose content and polarity. (Before, its samples were all zeros: one input.)
- **frames** (the same at rank 5, ``[N, C, D, H, W]`` or ``[N, D, H, W, C]``: a video, a volume,
  or one frame for a 3-D convolution): each sample one such picture seen through a window that
  pans across it by up to ``MAX_PAN`` pixels a frame, so that neighbouring frames are alike, as
  in a video and in the slices of a volume.
- **token ids** (integer, read by a Gather on a constant ``[vocabulary, width]`` table, through
  casts and reshapes): a Zipf law over the frequency-ordered block of rows that the row norms
  reveal, plus the common characters before it (:mod:`.synthetic_tokens`). An input named like
  a mask gets ones up to a length drawn per sample, like token types or segments zeros, like
  positions ``0, 1, ...`` along its last axis; other integers zeros.
- **audio** (float ``[N, T]``, ``[N, 1 or 2, T]`` or ``[N, T, 1 or 2]``, ``T >= 1000``): harmonic
  notes with attacks and decays over faint noise (:mod:`.synthetic_audio`).
- anything else: standard normal floats.

**Range fit.** A BatchNormalization right after a first Conv that reads the image directly
records the mean ``μ_k`` and variance ``σ²_k`` of that Conv's output channel ``k`` on the
training data. The Conv is linear, so on ``x = a z + b`` its output is ``a P_k + b Q_k + c_k``
with ``P = W * z``, ``Q = W * 1`` (the response to a constant image) and ``c`` the Conv bias.
Ignoring the border, where the padding makes ``Q`` vary, the variance is ``a² V_k`` with
``V_k = Var P_k``, and the two least-squares problems are solved in closed form, each channel
weighted by how much an error there moves the BatchNorm output (``γ_k`` its scale):

    log a² = Σ_k γ_k² log(σ²_k / V_k) / Σ_k γ_k²                 (variances, in log scale)
    b = Σ_k w_k Q̄_k (μ_k − c_k − a P̄_k) / Σ_k w_k Q̄_k²,  w_k = γ_k² / σ²_k     (means)

with bars for means over samples and positions. Second-order statistics cannot tell dark on
light from light on dark, nor pages from photographs, so every content (natural, text, their
mixture) in both polarities gets its fit, a few samples of each run through the model, and the
candidate whose activations best match the running statistics of *every* BatchNormalization
wins: the smallest mean over layers of ``Σ_k γ_k² KL_k / Σ_k γ_k²``, ``KL_k`` the divergence
of the Gaussian ``N(m_k, v_k)`` of the observed channel from ``N(μ_k, σ²_k)``. Without a
BatchNorm to fit (an exporter folded them), half the pictures natural, half text, half of each
inverted, are standardised to zero mean and unit variance over the set, and the description
says so: the range of models fed mean/std-normalised images, within a factor of two of
``[-1, 1]`` (measured on the digits ResNet at half the FLOPs over three seeds: 0.975 to 0.992
accuracy, 0.869 to 0.903 with ``[-1, 1]``).

**Text lines.** A picture at least three times as wide as tall
(:func:`~.rendered_text.is_text_line`) is a crop of one line of text, what a line recogniser or
a direction classifier reads: its candidates are text alone, in both polarities, its lines as
high as the picture, and without a BatchNorm it is all text, half inverted. Data-free over
seeds 0, 1, 2 at ``--flops 0.5`` (and 0.75), against the choice among every content: PP-OCRv4's
recogniser 0.920, 0.954, 0.970 (0.999, 0.998, 0.993) where it read 0.956, 0.972, 0.914 (0.984,
0.991, 0.960); PP-OCRv5's 0.976, 0.960, 0.979 (0.983, 0.986, 0.994) where 0.958, 0.980, 0.751
(0.982, 0.995, 0.992); the direction classifier 0.915, 0.935, 0.910 (0.980, 0.990, 0.940)
where 0.870, 0.965, 0.905 (0.990, 0.980, 0.980). ddddocr's reader, without BatchNorms, reads
0.903, 0.851, 0.884 at 0.5 where half natural pictures with lines at most 48 pixels high gave
0.754, 0.743, 0.774 (at 0.75 0.929, 0.912, 0.921 against 0.938, 0.920, 0.932).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import exposing
from .feature_rows import conv_patches
from .ir import Graph, Node
from .rendered_text import is_text_line, text_scene
from .sample_layout import model_feeds, sample_axis, sample_shape
from .synthetic_tokens import is_waveform, non_image_input, token_ids, varied_lengths
from .verify import session_for

__all__ = [
    "synthetic_calibration", "image_content", "frames_content", "image_inputs", "picture_values", "waveform_values",
    "token_ids", "fit_image_range",
]

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8
FIT_SAMPLES = 16  # images through the first Conv for the closed-form fit
FIT_ROWS = 8192  # output positions of those images used
SCORE_SAMPLES = 6  # images per candidate run through the model to compare BatchNorm statistics
CHUNK_VALUES = 2**23  # float64 values of the fields made at a time (64 MB)
CONTENTS = {"natural": 0.0, "text": 1.0, "natural and text": 0.5}  # share of text images
MAX_PAN = 2  # pixels a synthetic clip's window moves per frame, at most
PIXELS = "as 8-bit pixel values 0 to 255 (the input's type; the model scales them)"


def synthetic_calibration(graph: Graph, samples: int, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """``samples`` synthetic inputs per graph input (sample-major, :mod:`.sample_layout`; the input's
    dtype; a scalar input one value for all), deterministic for ``seed``, and one line describing
    them (see the module docstring)."""
    rng = np.random.default_rng(seed)
    arrays, notes, images = {}, {}, image_inputs(graph)
    for name in graph.inputs:
        if name in images:
            continue
        shape = (samples, *sample_shape(graph, name))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name])
        arrays[name], notes[name] = non_image_input(graph, name, shape, dtype, rng)
        if sample_axis(graph, name) is None:
            arrays[name] = np.full_like(arrays[name], arrays[name][0])
    notes.update(varied_lengths(graph, arrays, rng))
    for name in images:
        arrays[name], notes[name] = _image_input(graph, name, samples, arrays, rng)
    described = "; ".join(f"'{name}': {notes[name]}" for name in graph.inputs)
    return {name: arrays[name] for name in graph.inputs}, f"data-free, {samples} synthetic samples: {described}"


def image_inputs(graph: Graph) -> list[str]:
    """The graph inputs that get synthetic pictures (see the module docstring)."""
    return [name for name in graph.inputs if _image_layout(
        tuple(graph.input_shapes[name]), onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name])) is not None]


def picture_values(graph: Graph) -> int:
    """Values per sample of the graph inputs that get synthetic pictures (0: none)."""
    return sum(int(np.prod(sample_shape(graph, name))) for name in image_inputs(graph))


def waveform_values(graph: Graph) -> int:
    """Values per sample of the graph inputs that get synthetic notes (0: none)."""
    total = 0
    for name in graph.inputs:
        shape = (1, *sample_shape(graph, name))
        if is_waveform(graph, name, shape, onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name])):
            total += int(np.prod(shape))
    return total


def _image_layout(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """"NCHW" or "NHWC" for an image-like shape of floats or 8-bit pixels, "NCDHW" or "NDHWC" for
    frames of them, else None."""
    if len(shape) not in (4, 5) or not (np.issubdtype(dtype, np.floating) or dtype == np.uint8):
        return None
    if shape[1] in (1, 3, 4) and min(shape[-2:]) >= MIN_IMAGE_SIDE:
        return "NCHW" if len(shape) == 4 else "NCDHW"
    if shape[-1] in (1, 3, 4) and min(shape[-3:-1]) >= MIN_IMAGE_SIDE:
        return "NHWC" if len(shape) == 4 else "NDHWC"
    return None


def _picture_sizes(shape: tuple[int, ...], layout: str) -> tuple[int, int | None, int, int]:
    """``(channels, frames, height, width)`` of an input of ``shape`` in ``layout``; frames None
    for a single picture (rank 4)."""
    sizes = dict(zip(layout, shape))
    return sizes["C"], sizes.get("D"), sizes["H"], sizes["W"]


def _fields_per_chunk(height: int, width: int) -> int:
    """Fields ``[height, width]`` made at a time: about ``CHUNK_VALUES`` values."""
    return max(1, CHUNK_VALUES // (height * width))


def _pink_noise(rng: np.random.Generator, n: int, height: int, width: int, exponent: float = 1.0) -> np.ndarray:
    """``n`` fields ``[height, width]`` (float64) of zero mean and unit variance with amplitude
    spectrum ``1/f^exponent`` (white noise filtered in the Fourier domain), a chunk of fields at a
    time (the same draws in the same order as all at once)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    fields, step = np.empty((n, height, width)), _fields_per_chunk(height, width)
    for start in range(0, n, step):
        part = fields[start:start + step]
        field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(part.shape)) / frequency**exponent, s=(height, width))
        field -= field.mean(axis=(1, 2), keepdims=True)
        part[...] = field / np.maximum(field.std(axis=(1, 2), keepdims=True), 1e-12)
    return fields


def _draw_segments(canvas: np.ndarray, segments: np.ndarray, width: float, level: float) -> None:
    """Paint anti-aliased strokes of ``width`` pixels along ``segments`` (rows ``x0, y0, x1, y1``)
    at ``level`` into ``canvas`` ``[H, W]``, within their bounding box."""
    margin = width / 2 + 1
    xs, ys = segments[:, [0, 2]], segments[:, [1, 3]]
    x_low, x_high = int(max(xs.min() - margin, 0)), int(min(xs.max() + margin + 1, canvas.shape[1]))
    y_low, y_high = int(max(ys.min() - margin, 0)), int(min(ys.max() + margin + 1, canvas.shape[0]))
    if x_low >= x_high or y_low >= y_high:
        return
    y, x = np.mgrid[y_low:y_high, x_low:x_high] + 0.5
    start, step = segments[:, None, None, :2], segments[:, None, None, 2:] - segments[:, None, None, :2]
    point = np.stack([x, y], axis=-1)[None] - start
    t = np.clip((point * step).sum(-1) / np.maximum((step * step).sum(-1), 1e-9), 0, 1)
    distance = np.linalg.norm(point - t[..., None] * step, axis=-1).min(axis=0)
    cover = np.clip(width / 2 + 0.5 - distance, 0, 1)
    window = canvas[y_low:y_high, x_low:x_high]
    window += cover * (level - window)


def _natural_scene(rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1]: pink ``noise`` under two to seven occluding rectangles and ellipses
    (each a flat level with a shifted copy of the noise as texture) and up to three strokes."""
    height, width = noise.shape
    scene = 0.5 + 0.15 * noise
    y, x = np.mgrid[0:height, 0:width] + 0.5
    for _ in range(rng.integers(2, 8)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.4) * height + 1, rng.uniform(0.05, 0.4) * width + 1
        if rng.random() < 0.5:
            cover = np.clip(ry - np.abs(y - cy) + 0.5, 0, 1) * np.clip(rx - np.abs(x - cx) + 0.5, 0, 1)
        else:
            cover = np.clip((1 - np.hypot((y - cy) / ry, (x - cx) / rx)) * min(ry, rx) + 0.5, 0, 1)
        texture = rng.uniform(0.0, 0.12) * np.roll(noise, tuple(rng.integers(0, noise.shape)), axis=(0, 1))
        scene += cover * (rng.uniform(0, 1) + texture - scene)
    for _ in range(rng.integers(0, 4)):
        ends = rng.uniform(0, 1, (1, 4)) * [width, height, width, height]
        _draw_segments(scene, ends, rng.uniform(1, 4), rng.uniform(0, 1))
    return np.clip(scene, 0, 1)


def image_content(rng: np.random.Generator, n: int, channels: int, height: int, width: int, text_share: float) -> np.ndarray:
    """``n`` synthetic pictures ``[n, channels, height, width]`` in [0, 1], a share
    ``text_share`` of them text scenes spread evenly among natural ones (any leading run of
    samples has both); colour channels are the luminance plus independent smooth (``1/f²``)
    fields of amplitude 0.05 (near-grey colours)."""
    luminance = _pink_noise(rng, n, height, width)  # the noise, each field replaced by its scene
    text = np.floor((np.arange(n) + 1) * text_share) > np.floor(np.arange(n) * text_share)
    for i in range(n):
        luminance[i] = (text_scene if text[i] else _natural_scene)(rng, luminance[i])
    images = np.empty((n, channels, height, width), np.float32)
    step = max(1, _fields_per_chunk(height, width) // channels)
    for start in range(0, n, step):
        part = np.repeat(luminance[start:start + step, None], channels, axis=1)
        if channels > 1:
            part += 0.05 * _pink_noise(rng, len(part) * channels, height, width, 2.0).reshape(part.shape)
        images[start:start + step] = np.clip(part, 0, 1)
    return images


def frames_content(rng: np.random.Generator, n: int, channels: int, frames: int, height: int, width: int,
                   text_share: float) -> np.ndarray:
    """``n`` synthetic clips ``[n, channels, frames, height, width]`` in [0, 1]: each a picture of
    :func:`image_content`, ``(frames - 1) * MAX_PAN`` pixels wider than a frame, seen through a
    window whose left edge is at ``round(v t)`` in frame ``t``, the speed ``v`` drawn per clip
    from ``[0, MAX_PAN]`` pixels a frame (a camera panning)."""
    wide = image_content(rng, n, channels, height, width + (frames - 1) * MAX_PAN, text_share)
    starts = np.rint(rng.uniform(0, MAX_PAN, (n, 1)) * np.arange(frames)).astype(int)
    clips = np.empty((n, channels, frames, height, width), np.float32)
    for i, t in np.ndindex(n, frames):
        clips[i, :, t] = wide[i, :, :, starts[i, t] : starts[i, t] + width]
    return clips


@dataclass(frozen=True)
class _Candidate:
    """A content family, a polarity and the map ``x = scale * z + shift`` of its pictures."""

    content: str
    inverted: bool
    scale: float
    shift: float

    def text(self, noun: str = "pictures") -> str:
        polarity = "inverted" if self.inverted else "as drawn"
        return f"{self.content} {noun} ({polarity}), x = {self.scale:.3g} z {self.shift:+.3g}"


def _first_batchnorm(graph: Graph, name: str) -> tuple[Node, Node] | None:
    """The ungrouped 2-D Conv reading input ``name`` directly and the BatchNormalization that
    alone reads its output, both with constant parameters; None when there is no such pair."""
    for conv in graph.consumers.get(name, []):
        if conv.op_type != "Conv" or conv.inputs[0] != name or int(conv.attr("group", 1)) != 1 \
                or not graph.is_constant(conv.inputs[1]) or graph.constants[conv.inputs[1]].ndim != 4:
            continue
        readers = graph.consumers.get(conv.outputs[0], [])
        if len(readers) == 1 and readers[0].op_type == "BatchNormalization" \
                and all(graph.is_constant(t) for t in readers[0].inputs[1:5]):
            return conv, readers[0]
    return None


def _batchnorm_stats(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(γ², μ, σ²)`` of a BatchNormalization, float64, the variance at least its epsilon."""
    gamma, _, mean, var = (graph.constants[t].astype(np.float64) for t in node.inputs[1:5])
    return gamma**2, mean, np.maximum(var, float(node.attr("epsilon", 1e-5)))


def fit_image_range(graph: Graph, conv: Node, batchnorm: Node, pictures: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` such that the ``conv`` outputs on ``a * pictures + b`` best match the running
    statistics of ``batchnorm`` (the closed-form least squares of the module docstring)."""
    weight = graph.constants[conv.inputs[1]].astype(np.float64)
    bias = graph.constants[conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] else np.zeros(len(weight))
    out = graph.shapes[conv.outputs[0]]
    positions = len(pictures) * out[2] * out[3]
    rows = np.linspace(0, positions - 1, min(FIT_ROWS, positions)).astype(int)
    matrix = weight.reshape(len(weight), -1).T

    def response(images: np.ndarray) -> np.ndarray:
        return conv_patches(images.astype(np.float64), conv, weight.shape[2:], rows) @ matrix

    p, q = response(pictures), response(np.ones_like(pictures))
    importance, mean, var = _batchnorm_stats(graph, batchnorm)
    variance = p.var(axis=0)
    live = variance > 1e-12 * variance.max()
    log_scale2 = np.sum(importance[live] * np.log(var[live] / variance[live])) / max(importance[live].sum(), 1e-30)
    scale = float(np.exp(log_scale2 / 2))
    weights, ones = importance / var, q.mean(axis=0)
    denominator = np.sum(weights * ones**2)
    if denominator < 1e-12 * max(np.sum(weights), 1e-30):
        return scale, -scale * float(pictures.mean())  # filters that ignore the mean: centre the pictures
    return scale, float(np.sum(weights * ones * (mean - bias - scale * p.mean(axis=0))) / denominator)


def _batchnorms(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op_type == "BatchNormalization" and all(graph.is_constant(t) for t in n.inputs[1:5])]


def _batchnorm_mismatch(graph: Graph, session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> float:
    """Mean over BatchNormalization layers of ``Σ_k γ_k² KL_k / Σ_k γ_k²`` between the Gaussian
    of each channel observed on ``feeds`` (one sample each) and the running statistics;
    ``session`` runs the model with every BatchNorm input exposed."""
    layers = _batchnorms(graph)
    names = sorted({n.inputs[0] for n in layers})
    moments: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            flat = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1).astype(np.float64)
            moments[name].append(np.stack([flat.mean(axis=1), (flat**2).mean(axis=1)]))
    total = 0.0
    for node in layers:
        importance, mean, var = _batchnorm_stats(graph, node)
        first, second = np.mean(moments[node.inputs[0]], axis=0)
        observed = np.maximum(second - first**2, 1e-12)
        divergence = 0.5 * (observed / var + (first - mean) ** 2 / var - 1 - np.log(observed / var))
        total += np.sum(importance * divergence) / max(importance.sum(), 1e-30)
    return total / len(layers)


def _standardising(pictures: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` giving ``a * pictures + b`` zero mean and unit variance over all its values."""
    std = max(float(pictures.std()), 1e-6)
    return 1.0 / std, -float(pictures.mean()) / std


def _pixel_range(pictures: np.ndarray) -> tuple[float, float]:
    """``(255, 0)``: 8-bit pixel values, which the model scales itself."""
    return 255.0, 0.0


def _image_input(
    graph: Graph, name: str, samples: int, arrays: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Pictures for image input ``name``: every candidate content (text alone for a text-line
    crop) and polarity fitted, the one matching the BatchNorm statistics best kept (see the
    module docstring); ``arrays`` holds the other inputs, fed alongside."""
    shape = (samples, *graph.input_shapes[name][1:])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.dtypes[name])
    pixels = dtype == np.uint8
    layout = _image_layout(shape, dtype)
    channels, frames, height, width = _picture_sizes(shape, layout)
    noun = "pictures" if frames is None else "single-frame pictures" if frames == 1 else f"{frames}-frame panning clips"

    def draw(n: int, text_share: float) -> np.ndarray:
        """``n`` pictures (or clips) channels first, ``text_share`` of them text."""
        if frames is None:
            return image_content(rng, n, channels, height, width, text_share)
        return frames_content(rng, n, channels, frames, height, width, text_share)

    def as_input(pictures: np.ndarray, scale: float, shift: float) -> np.ndarray:
        """``scale * pictures + shift`` in the input's layout and dtype, made in ``pictures``
        (rounded, for 8-bit pixels)."""
        pictures *= scale
        pictures += shift
        if pixels:
            np.rint(pictures, out=pictures)
        return (pictures if layout[1] == "C" else np.moveaxis(pictures, 1, -1)).astype(dtype, copy=False)

    batchnorms = _batchnorms(graph)
    text_line = is_text_line(height, width)
    shape_note = f"; text alone: shaped like a text line ({width}x{height})" if text_line else ""
    if not batchnorms:
        content = "text" if text_line else "natural and text"
        pictures = draw(samples, CONTENTS[content])
        inverted = np.arange(samples) // 2 % 2 == 1  # pairs alternate: either kind of scene, both polarities
        pictures[inverted] = 1 - pictures[inverted]
        how = PIXELS if pixels else "standardised to zero mean and unit variance (a default: no BatchNorm to fit)"
        return as_input(pictures, *(_pixel_range if pixels else _standardising)(pictures)), (
            f"{samples} {content} {noun}, half inverted, {how}{shape_note}"
        )
    fit = int(np.clip(2_000_000 // (channels * (frames or 1) * height * width), 2, FIT_SAMPLES))
    texts = draw(fit, 1.0)
    if text_line:
        families = {"text": texts}
    else:
        naturals = draw(fit, 0.0)
        alternating = np.stack([naturals, texts], axis=1).reshape(2 * fit, *texts.shape[1:])[:fit]
        families = {"natural": naturals, "text": texts, "natural and text": alternating}
    pair = _first_batchnorm(graph, name) if layout == "NCHW" and not pixels else None
    fitted = _pixel_range if pixels else partial(fit_image_range, graph, *pair) if pair else _standardising
    session = session_for(exposing(graph.model, sorted({n.inputs[0] for n in batchnorms})), optimize=False)
    scored = []
    for content, pictures in families.items():
        for inverted in (False, True):
            z = 1 - pictures if inverted else pictures
            candidate = _Candidate(content, inverted, *fitted(z))
            x = as_input(z[:SCORE_SAMPLES].copy(), candidate.scale, candidate.shift)
            feeds = [model_feeds(graph, {**{k: v[i : i + 1] for k, v in arrays.items()}, name: x[i : i + 1]})
                     for i in range(len(x))]
            scored.append((_batchnorm_mismatch(graph, session, feeds), candidate))
            log.debug("'%s': %s, BatchNorm mismatch %.4g", name, candidate.text(), scored[-1][0])
    mismatch, best = min(scored, key=lambda item: item[0])
    pictures = draw(samples, CONTENTS[best.content])
    if best.inverted:
        np.subtract(1, pictures, out=pictures)
    how = PIXELS if pixels else f"range fitted to BatchNorm '{pair[1].name}' after Conv '{pair[0].name}'" if pair \
        else "standardised to zero mean and unit variance (a default: no BatchNorm right after a first Conv)"
    chosen = "polarity" if text_line else "content and polarity"
    return as_input(pictures, best.scale, best.shift), (
        f"{samples} {best.text(noun)}, {how}; {chosen} matching {len(batchnorms)} BatchNorm "
        f"layers best (mismatch {mismatch:.3g}){shape_note}"
    )
