"""Deterministic synthetic text images with ground truth: single lines and pages of lines.

Text is drawn with PIL's built-in scalable font (``ImageFont.load_default(size=...)``, the
Aileron face bundled with Pillow >= 10.1), so any machine with Pillow renders the same pixels
and nothing is downloaded.  The words come from the English sentences of ``models.sentences``
plus numbers, prices, dates and codes, in mixed case.  Images are ``uint8`` BGR arrays (the
channel order of OpenCV, which rapidocr's pre-processing expects)::

    lines = render_lines(100, seed=0)         # [TextLine(image, text)], tightly cropped lines
    pages = render_pages(20, seed=0, size=320)  # [TextPage(image, boxes, texts)], boxes x0,y0,x1,y1

Everything derives from ``numpy.random.default_rng(seed)``: the same arguments give the same
arrays.  Different seeds give different texts; ``render_lines(..., exclude=...)`` drops given
texts, so a calibration set can be made disjoint from a test set.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .sentences import CALIBRATION, SENTENCES

__all__ = ["MAX_ASPECT", "TextLine", "TextPage", "line_texts", "render_lines", "render_pages"]

MAX_ASPECT = 320 / 48
"""Widest line rendered (width / height): the PP-OCR recogniser's 3x48x320 input holds it unsqueezed."""

_LINE_FONT_SIZES = (20, 40)
_PAGE_FONT_SIZES = (14, 24)
_LINE_EXTENT = "Hg"
"""A page's line box spans the height of these glyphs (capital top to descender), whatever the text."""


@dataclass(frozen=True)
class TextLine:
    """One cropped text line: ``image`` uint8 BGR [h, w, 3] showing exactly ``text``."""

    image: np.ndarray
    text: str


@dataclass(frozen=True)
class TextPage:
    """A page: ``image`` uint8 BGR [size, size, 3], and per drawn line its ``boxes`` row
    ``(x0, y0, x1, y1)`` in pixels (left and right end of the ink; top of a capital letter and
    bottom of a descender at the line's font size) and its text."""

    image: np.ndarray
    boxes: np.ndarray
    texts: tuple[str, ...]


@lru_cache(maxsize=None)
def _words() -> tuple[str, ...]:
    """Distinct alphabetic words of the corpus sentences, in first-seen order."""
    seen: dict[str, None] = {}
    for sentence in (*SENTENCES, *CALIBRATION):
        for word in re.findall(r"[A-Za-z]+", sentence):
            seen.setdefault(word, None)
    return tuple(seen)


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _token(rng: np.random.Generator) -> str:
    """A word (lower, capitalised or upper case) or, one time in four, a number-like token."""
    kind = rng.random()
    if kind < 0.25:
        pick = int(rng.integers(4))
        if pick == 0:
            return str(int(rng.integers(0, 100000)))
        if pick == 1:
            return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
        if pick == 2:
            return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, 2))
        return f"{letters}{rng.integers(10, 1000)}"
    word = _words()[int(rng.integers(len(_words())))]
    case = rng.random()
    return word.upper() if case < 0.1 else word.capitalize() if case < 0.4 else word.lower()


def _text_stream(seed: int | Sequence[int], max_chars: int) -> Iterator[str]:
    """Endless distinct texts of one to three tokens, at most ``max_chars`` characters."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    while True:
        text = " ".join(_token(rng) for _ in range(int(rng.integers(1, 4))))
        if len(text) <= max_chars and text not in seen:
            seen.add(text)
            yield text


def line_texts(count: int, seed: int | Sequence[int], exclude: Collection[str] = (), max_chars: int = 14) -> list[str]:
    """The first ``count`` distinct texts of one to three tokens, at most ``max_chars``
    characters, that are not in ``exclude`` (a longer list starts with a shorter one)."""
    return list(itertools.islice((t for t in _text_stream(seed, max_chars) if t not in exclude), count))


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
    """Dark ink (RGB) and a light background grey."""
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    return ink, int(rng.integers(200, 256))  # type: ignore[return-value]


def _finish(canvas: Image.Image, rng: np.random.Generator, noise: float) -> np.ndarray:
    """RGB canvas -> uint8 BGR array with seeded Gaussian pixel noise."""
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, noise, pixels.shape).astype(np.float32)
    return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)[:, :, ::-1])


def _render_line(text: str, rng: np.random.Generator) -> TextLine | None:
    """``text`` on a light background cropped to its ink box plus a small margin; None when it
    is wider than ``MAX_ASPECT``."""
    font = _font(int(rng.integers(*_LINE_FONT_SIZES)))
    ink, background = _colours(rng)
    x0, y0, x1, y1 = font.getbbox(text)
    margin = rng.integers(2, 7, 4)
    width, height = x1 - x0 + margin[0] + margin[2], y1 - y0 + margin[1] + margin[3]
    if width > MAX_ASPECT * height:
        return None
    canvas = Image.new("RGB", (int(width), int(height)), (background,) * 3)
    ImageDraw.Draw(canvas).text((int(margin[0] - x0), int(margin[1] - y0)), text, font=font, fill=ink)
    return TextLine(_finish(canvas, rng, noise=float(rng.uniform(0, 8))), text)


def render_lines(count: int, seed: int, exclude: Collection[str] = ()) -> list[TextLine]:
    """``count`` line images of distinct texts as drawn by ``line_texts``, skipping texts too
    wide for ``MAX_ASPECT`` at their drawn size; a longer list starts with a shorter one."""
    rng = np.random.default_rng([seed, 0])
    lines: list[TextLine] = []
    texts = (text for text in _text_stream([seed, 1], max_chars=14) if text not in exclude)
    while len(lines) < count:
        line = _render_line(next(texts), rng)
        if line is not None:
            lines.append(line)
    return lines


def render_pages(count: int, seed: int, size: int = 320, lines_per_page: tuple[int, int] = (3, 7)) -> list[TextPage]:
    """``count`` square pages of ``size`` pixels, each with a random number of text lines in
    ``lines_per_page`` (half-open) stacked top to bottom in separate bands at random left
    offsets, none touching another or the border."""
    rng = np.random.default_rng([seed, 2])
    pages = []
    for index in range(count):
        n_lines = int(rng.integers(*lines_per_page))
        texts = line_texts(n_lines, seed=[seed, 3, index], max_chars=24)
        ink, background = _colours(rng)
        canvas = Image.new("RGB", (size, size), (background,) * 3)
        draw = ImageDraw.Draw(canvas)
        band = size // n_lines
        boxes = []
        for row, text in enumerate(texts):
            font_size = int(rng.integers(*_PAGE_FONT_SIZES))
            while _font(font_size).getlength(text) > size - 16:
                font_size -= 1
            font = _font(font_size)
            x0, _, x1, _ = font.getbbox(text)
            _, y0, _, y1 = font.getbbox(_LINE_EXTENT)
            left = int(rng.integers(8, size - 8 - (x1 - x0) + 1))
            top = row * band + int(rng.integers(4, max(5, band - (y1 - y0) - 4)))
            draw.text((left - x0, top - y0), text, font=font, fill=ink)
            boxes.append((left, top, left + x1 - x0, top + y1 - y0))
        pages.append(TextPage(_finish(canvas, rng, noise=float(rng.uniform(0, 6))), np.array(boxes), tuple(texts)))
    return pages
