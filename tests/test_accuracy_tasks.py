"""Accuracy tasks: deterministic data, disjoint calibration, metrics, and the unpruned models' scores."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rapidocr_onnxruntime")
pytest.importorskip("cv2")

from models.minilm_task import generate_sentences, nearest_neighbours  # noqa: E402
from models.ocr_tasks import ClsTask, DetTask, OrientTask, RecTask, box_f1, character_accuracy, edit_distance  # noqa: E402
from models.peers import match_target  # noqa: E402
from models.text_render import MAX_ASPECT, render_lines, render_pages  # noqa: E402


def test_edit_distance_and_character_accuracy():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    # spaces are ignored; one substitution in 4 characters; an empty reading scores 0
    assert character_accuracy([" ab cd ", "abxd", ""], ["abcd", "abcd", "abcd"]) == pytest.approx((1 + 0.75 + 0) / 3)
    assert character_accuracy(["abcdefgh"], ["ab"]) == 0.0  # capped at 0, never negative


def test_box_f1_matches_one_to_one_at_iou_half():
    truth = [np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)]
    assert box_f1([truth[0].copy()], truth) == 1.0
    # IoU 0.5 matches, below does not; two detections on one true box count once
    assert box_f1([np.array([[0, 0, 10, 20]], dtype=float)], truth) == pytest.approx(2 * 1 / 3)
    assert box_f1([np.array([[0, 0, 10, 21]], dtype=float)], truth) == 0.0
    assert box_f1([np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)], truth) == pytest.approx(2 * 1 / 4)
    assert box_f1([np.zeros((0, 4))], truth) == 0.0


def test_rendering_is_deterministic_and_calibration_disjoint():
    first, again = render_lines(12, seed=0), render_lines(12, seed=0)
    assert [line.text for line in first] == [line.text for line in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert [line.text for line in render_lines(5, seed=0)] == [line.text for line in first[:5]]
    assert all(line.image.dtype == np.uint8 and line.image.shape[1] <= MAX_ASPECT * line.image.shape[0]
               for line in first)
    calibration = render_lines(40, seed=1, exclude={line.text for line in first})
    assert not {line.text for line in calibration} & {line.text for line in first}
    pages, pages_again = render_pages(3, seed=0), render_pages(3, seed=0)
    for page, other in zip(pages, pages_again):
        assert np.array_equal(page.image, other.image) and np.array_equal(page.boxes, other.boxes)
        assert page.image.shape == (320, 320, 3) and len(page.boxes) == len(page.texts) >= 3
        assert (page.boxes[:, :2] >= 0).all() and (page.boxes[:, 2:] <= 320).all()


def test_recogniser_reads_rendered_lines():
    task = RecTask(test_samples=20)
    source, shapes = task.source()
    assert shapes == {"x": (1, 3, 48, 320)}
    assert task.test_inputs.shape == (20, 3, 48, 320) and task.test_inputs.dtype == np.float32
    assert np.array_equal(task.test_inputs, RecTask(test_samples=20).test_inputs)
    assert task.evaluate(source) >= 0.95


def test_recogniser_calibration_file(tmp_path):
    task = RecTask(test_samples=20)
    path = task.calibration(tmp_path / "rec.npz", 16)
    with np.load(path) as data:
        assert list(data) == ["x"] and data["x"].shape == (16, 3, 48, 320)
        np.testing.assert_array_equal(data["x"], task.calibration_inputs(16)["x"])
        assert not any(np.array_equal(x, y) for x in data["x"] for y in task.test_inputs)


def test_direction_classifier_on_half_upside_down_lines():
    task = ClsTask(test_samples=20)
    images, labels = task.test_inputs
    assert images.shape == (20, 3, 48, 192) and labels.tolist() == [0, 1] * 10
    assert task.evaluate(task.source()[0]) >= 0.9


def test_detector_finds_rendered_lines():
    task = DetTask(test_samples=4)
    assert task.test_inputs.shape == (4, 3, 320, 320)
    assert task.evaluate(task.source()[0]) >= 0.9
    assert task.calibration_inputs(2)["x"].shape == (2, 3, 320, 320)


@pytest.mark.accurate
def test_orientation_classifier_on_turned_pages(tmp_path):
    """All four angles on 16 pages are read right by the unpruned classifier; pruned data-free to
    three quarters of its FLOPs, it keeps at least 15 of them."""
    from spa_compiler import PruneConfig, prune

    task = OrientTask(test_samples=16)
    images, labels = task.test_inputs
    assert images.shape == (16, 3, 224, 224) and labels.tolist() == [0, 3, 2, 1] * 4
    source, shapes = task.source()
    assert task.evaluate(source) == 1.0
    report = prune(source, tmp_path / "small.onnx", PruneConfig(flops=0.75, input_shapes=shapes, round_to=task.round_to,
                                                                bench_runs=0))
    assert report.flops_ratio <= 0.76 and task.evaluate(tmp_path / "small.onnx") >= 15 / 16


def test_sentences_and_nearest_neighbours():
    sentences = generate_sentences(50, seed=0)
    assert sentences == generate_sentences(50, seed=0) and len(set(sentences)) == 50
    assert not set(generate_sentences(50, seed=1, exclude=sentences)) & set(sentences)
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert nearest_neighbours(embeddings).tolist() == [1, 0, 3, 2]


def test_target_search_finds_the_closest_ratio():
    amount, ratio = match_target(lambda amount: 1.0 - amount, 0.5)
    assert ratio == pytest.approx(0.5, abs=0.005) and amount == pytest.approx(1.0 - ratio)
    steps = []
    match_target(lambda amount: steps.append(amount) or 1.0 - amount ** 2, 0.5, steps=6)
    assert len(steps) <= 7 and abs(1.0 - steps[-1] ** 2 - 0.5) <= 0.005
    # out of reach: the most the tool prunes; a step: the closer side
    assert match_target(lambda amount: 1.0 - amount / 4, 0.5, high=0.95) == (0.95, pytest.approx(0.7625))
    assert match_target(lambda amount: 1.0 if amount < 0.3 else 0.42, 0.5)[1] == 0.42
