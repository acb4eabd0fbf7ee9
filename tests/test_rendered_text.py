"""Data-free pictures of text: the shipped glyphs, area resizing, lines and scenes."""

from __future__ import annotations

import numpy as np
import pytest

from spa_compiler import rendered_text
from spa_compiler.rendered_text import (
    CHARACTERS, _upright_scene, area_resize, faces, is_text_line, text_line, text_scene,
)


def test_shipped_faces_hold_every_printable_character():
    shipped = faces()
    assert len(shipped) == 5
    for face in shipped:
        assert len(face.starts) == len(CHARACTERS) + 1 and len(face.advances) == len(CHARACTERS)
        assert face.strip.shape == (face.height, face.starts[-1]) and 0 <= face.strip.min() and face.strip.max() <= 1
        assert face.cell(" ").max() == 0 and face.advance(" ") > 0  # a space moves the pen, draws nothing
        assert face.cell("W").sum() > 3 * face.cell(".").sum() > 0
        assert face.cell("é").shape == face.cell(" ").shape  # outside ASCII: a space


def test_area_resize_averages_the_covered_input():
    image = np.random.default_rng(0).uniform(size=(6, 9))
    blocks = image.reshape(2, 3, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(area_resize(image, 2, 3), blocks, rtol=0, atol=1e-12)
    np.testing.assert_allclose(area_resize(image, 6, 9), image, rtol=0, atol=1e-12)
    # a non-integer factor: a constant stays, and output pixel 0 of 3 covers input pixels [0, 10/3)
    np.testing.assert_allclose(area_resize(np.full((7, 5), 0.3), 3, 2), 0.3, rtol=0, atol=1e-12)
    ramp = area_resize(np.tile(np.arange(10.0), (4, 1)), 4, 3)
    np.testing.assert_allclose(ramp[:, 0], (0 + 1 + 2 + 3 / 3) / (10 / 3), rtol=1e-12)


def test_text_line_lays_glyphs_at_the_pen_positions():
    face = faces()[2]  # DejaVu Sans Mono: every advance the same
    height = face.height // 2
    one, three = text_line(face, "l", height, 1000), text_line(face, "lll", height, 1000)
    assert one.shape[0] == three.shape[0] == height
    assert three.shape[1] - one.shape[1] == pytest.approx(2 * face.advance("l") / 2, abs=1)
    assert three.sum() == pytest.approx(3 * one.sum(), rel=0.05)  # three strokes' ink, none overlapping
    assert text_line(face, "   ", height, 1000).max() == 0
    long = text_line(face, "x" * 400, height, 120)  # stops once the pen passes 120 pixels
    assert 120 <= long.shape[1] <= 120 + (face.advance("x") + 2 * 8) / 2 + 1


def test_text_scene_is_dark_ink_on_a_light_page_and_seeded():
    noise = np.random.default_rng(1).standard_normal((48, 320))
    scenes = [text_scene(np.random.default_rng(seed), noise) for seed in range(12)]
    np.testing.assert_array_equal(scenes[0], text_scene(np.random.default_rng(0), noise))
    for scene in scenes:
        assert scene.shape == (48, 320) and 0 <= scene.min() and scene.max() <= 1
        page = np.median(scene)
        assert page > 0.6 and 0.03 < np.mean(scene < page - 0.25) < 0.5  # ink covers part of the line
    flipped = 0
    for seed in range(40):  # each scene is its upright drawing or that turned by 180 degrees
        scene, upright = (f(np.random.default_rng(seed), noise) for f in (text_scene, _upright_scene))
        flipped += np.array_equal(scene, upright[::-1, ::-1])
        assert np.array_equal(scene, upright) or np.array_equal(scene, upright[::-1, ::-1])
    assert 12 <= flipped <= 28


@pytest.mark.parametrize("height, width, text_line_crop", [(48, 320, True), (64, 384, True), (32, 96, True),
                                                           (48, 143, False), (224, 224, False), (320, 640, False)])
def test_pictures_three_times_as_wide_as_tall_are_text_line_crops(height, width, text_line_crop):
    assert is_text_line(height, width) is text_line_crop


@pytest.mark.parametrize("height, width, low, high", [(64, 384, 0.55 * 0.8 * 64, 64), (320, 320, 0.55 * 0.8 * 48, 48),
                                                      (32, 32, 0.55 * 0.8 * 32, 32)])
def test_lines_fill_a_text_line_crop_and_stay_at_most_48_high_on_a_page(monkeypatch, height, width, low, high):
    """A text-line crop's lines are up to its height (a reader resizes the line to fill it); a
    page's up to 48 pixels, whatever its size."""
    heights = []

    def recording(face, text, line_height, max_width):
        heights.append(line_height)
        return text_line(face, text, line_height, max_width)

    monkeypatch.setattr(rendered_text, "text_line", recording)
    noise = np.random.default_rng(1).standard_normal((height, width))
    for seed in range(30):
        _upright_scene(np.random.default_rng(seed), noise)
    assert low - 1 <= min(heights) and max(heights) <= high
    assert max(heights) > 0.9 * high  # the whole range is drawn
