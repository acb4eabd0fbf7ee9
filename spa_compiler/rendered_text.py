"""Pictures of text for data-free calibration, drawn with glyphs that ship with spa-prune.

A model that reads text (a line recogniser, a direction classifier, a text detector) learned
its filters from the shapes of letters; the statistics that choose its channels should come
from letters too. ``text/glyphs.npz`` holds the printable ASCII characters of five DejaVu faces
(Sans, Serif, Sans Mono, Sans Bold, Serif Italic) drawn at 32 pixels per em, each in a cell
``[ascender to descender, advance + 2 PAD]`` with the pen at ``PAD`` (``python -m
models.make_glyphs`` writes it; the DejaVu licence is ``text/LICENSE_DEJAVU.txt``).

A line of text lays its characters' cells at the pen positions (overlaps keep the larger
ink), then is resized to the line height wanted by area averaging, one axis after the other:
each output pixel is the mean of the input area it covers (from running sums), so small text
is not aliased.

A scene (:func:`text_scene`) is lines of English words (those of ``text/english.txt``), each
line in a face of its own, dark ink on a light page textured by the scene's noise, lines 0.8 to
1.0 of a height drawn per scene, 15% of the lines in capitals and 15% with digits for some
letters; half the scenes upside down, as scans and photographs show text either way up. The
height drawn is 0.55 to 1.0 of ``min(height, 48)`` pixels (text as a page shows it, at most as
high as PP-OCR's 48-pixel line crops), except in a picture at least ``TEXT_LINE_ASPECT`` times
as wide as tall: that is a text-line crop itself (:func:`is_text_line`), which a reader resizes
so that its line fills its height, so there it is 0.55 to 1.0 of the picture's height.

On PP-OCR data-free, seeds 0, 1 and 2, against the procedural strokes these replace: the
recogniser reads 0.998, 0.998, 0.983 of its characters at ``--flops 0.75`` (0.977, 0.965,
0.946) and 0.954, 0.816, 0.801 at 0.5 (0.874, 0.683, 0.592); the direction classifier keeps
0.900, 0.885, 0.815 at 0.5 (0.835, 0.675, 0.770). One face and one line height per scene did
better at 0.5 (recogniser 0.959, 0.968, 0.890) but worse at 0.75 (0.879, 0.896, 0.998).
ddddocr's text reader, 64 pixels high, reads 0.903, 0.851, 0.884 of its characters at 0.5 with
lines as high as its input, where lines at most 48 high gave 0.821, 0.837, 0.850 (both on text
scenes alone, see :mod:`.synthetic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

__all__ = [
    "CHARACTERS", "GLYPHS", "PAD", "TEXT_LINE_ASPECT", "Face", "faces", "area_resize", "is_text_line", "text_line",
    "text_scene",
]

TEXT_FOLDER = Path(__file__).resolve().parent / "text"
GLYPHS = TEXT_FOLDER / "glyphs.npz"
CHARACTERS = "".join(chr(code) for code in range(32, 127))  # printable ASCII, the space first
PAD = 8  # pixels of cell on either side of the pen's path, for overhanging strokes
CROP_LINE_HEIGHT = 48  # pixels from ascender to descender of a line in a page's crop, at most
TEXT_LINE_ASPECT = 3  # a picture this many times as wide as tall, or more, is a text-line crop


@dataclass(frozen=True)
class Face:
    """One face's glyph cells side by side (``strip``, ink in [0, 1]), each cell's first column
    (``starts``, one more than the characters) and each character's pen advance in pixels."""

    strip: np.ndarray
    starts: np.ndarray
    advances: np.ndarray

    @property
    def height(self) -> int:
        return self.strip.shape[0]

    def cell(self, character: str) -> np.ndarray:
        index = max(CHARACTERS.find(character), 0)  # outside ASCII: a space
        return self.strip[:, self.starts[index]:self.starts[index + 1]]

    def advance(self, character: str) -> float:
        return float(self.advances[max(CHARACTERS.find(character), 0)])


@cache
def faces() -> tuple[Face, ...]:
    """The shipped faces, in ``models.make_glyphs.FACES`` order."""
    with np.load(GLYPHS) as stored:
        count = sum(name.startswith("strip") for name in stored.files)
        return tuple(Face(stored[f"strip{i}"].astype(np.float32) / 255, stored[f"starts{i}"], stored[f"advances{i}"])
                     for i in range(count))


@cache
def _words() -> tuple[str, ...]:
    return tuple((TEXT_FOLDER / "english.txt").read_text(encoding="utf-8").split())


def _area_mean(image: np.ndarray, target: int) -> np.ndarray:
    """``image`` resized along its last axis to ``target``: output pixel ``i`` is the mean of the
    piecewise constant input over ``[i s, (i + 1) s)``, ``s = n / target``, from the running sum
    ``F(x) = Σ_{j < ⌊x⌋} image_j + (x − ⌊x⌋) image_⌊x⌋``: ``(F((i + 1) s) − F(i s)) / s``."""
    count = image.shape[-1]
    running = np.concatenate([np.zeros(image.shape[:-1] + (1,)), np.cumsum(image, axis=-1)], axis=-1)
    edges = np.arange(target + 1) * (count / target)
    whole = np.minimum(edges.astype(int), count - 1)
    at_edges = running[..., whole] + (edges - whole) * image[..., whole]
    return np.diff(at_edges, axis=-1) / (count / target)


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image [h, w]`` resized to ``[height, width]`` by area averaging (module docstring)."""
    return _area_mean(_area_mean(image, width).T, height).T


def text_line(face: Face, text: str, height: int, max_width: int) -> np.ndarray:
    """The ink ``[height, w]`` of ``text`` in ``face``, a line ``height`` pixels from ascender to
    descender; characters whose pen position passes ``max_width`` are left out."""
    scale = height / face.height
    pen, placed = 0.0, []
    for character in text:
        if pen * scale > max_width:
            break
        placed.append((int(round(pen)), face.cell(character)))
        pen += face.advance(character)
    canvas = np.zeros((face.height, max(x + cell.shape[1] for x, cell in placed)), dtype=np.float32)
    for x, cell in placed:
        window = canvas[:, x:x + cell.shape[1]]
        np.maximum(window, cell, out=window)
    return area_resize(canvas, height, max(1, int(round(canvas.shape[1] * scale))))


def is_text_line(height: int, width: int) -> bool:
    """Whether a ``height x width`` picture is shaped like a crop of one text line, as a line
    recogniser or a direction classifier reads it: ``TEXT_LINE_ASPECT`` times as wide as tall."""
    return width >= TEXT_LINE_ASPECT * height


def _phrase(rng: np.random.Generator) -> str:
    """Twenty consecutive words of the shipped sentences, 15% in capitals, 15% with digits."""
    words = _words()
    start = int(rng.integers(len(words)))
    text = " ".join(words[start:start + 20])
    kind = rng.random()
    if kind < 0.15:
        return text.upper()
    if kind < 0.3:
        digits = rng.integers(0, 10, len(text))
        swapped = rng.random(len(text)) < 0.3
        return "".join(str(d) if s and c.isalpha() else c for c, d, s in zip(text, digits, swapped))
    return text


def text_scene(rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Luminance ``[H, W]`` in [0, 1] of ``noise``'s size: lines of text (module docstring), upside
    down half the time."""
    scene = _upright_scene(rng, noise)
    return scene[::-1, ::-1] if rng.random() < 0.5 else scene


def _upright_scene(rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """The scene of :func:`text_scene` before it may be turned."""
    height, width = noise.shape
    ink, page = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
    shipped = faces()
    base = rng.uniform(0.55, 1.0) * (height if is_text_line(height, width) else min(height, CROP_LINE_HEIGHT))
    line = max(4, int(round(base)))
    top = rng.uniform(-0.15, 0.25) * line if height < 2 * line else rng.uniform(0, line * 1.7)
    cover = np.zeros((height, width))
    while top < height:
        face = shipped[int(rng.integers(len(shipped)))]
        line = max(4, int(round(base * rng.uniform(0.8, 1.0))))
        pitch = line * rng.uniform(1.0, 1.7)
        left, row = int(rng.uniform(0, 0.25) * width), int(round(top))
        drawn = text_line(face, _phrase(rng), line, width - left)
        rows = slice(max(row, 0), min(row + line, height))
        part = drawn[rows.start - row:rows.stop - row, : width - left]
        window = cover[rows, left:left + part.shape[1]]
        np.maximum(window, part, out=window)
        top += pitch
    scene = page + 0.04 * noise
    scene += cover * (ink - scene)
    return np.clip(scene, 0, 1)
