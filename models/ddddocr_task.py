"""Accuracy task: ddddocr's text reader (its ``beta`` model, ``common.onnx``) on rendered text lines.

ddddocr (``pip install --no-deps ddddocr==1.6.1``) ships a captcha and text recogniser: a
convolutional network whose BatchNorms its export folded away, a bidirectional LSTM over the
image columns and a classifier over 8,210 characters, read by greedy CTC (blank 0). Its zero
initial LSTM states are ``ConstantOfShape`` of a run-time shape, as PyTorch exports them.
Pre-processing is ddddocr's own (``core/ocr_engine.py``): the image resized to height 64 keeping
its aspect ratio, grey, divided by 255. The model reads any width; the task binds ``WIDTH``, and
a narrower line is padded on the right with its background (the mean of its last column), a
wider one squeezed to it. The lines are ``models.text_render``'s, test and calibration drawn as
for the PP-OCR recogniser (``models.ocr_tasks``: seed 0, seed 1 without the test texts). Metric:
**character accuracy** (``models.ocr_tasks.character_accuracy``).
"""

from __future__ import annotations

import runpy
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from .ocr_tasks import CALIBRATION_SEED, TEST_SEED, character_accuracy
from .shipped import package_dir
from .tasks import Shapes, Task
from .text_render import TextLine, render_lines

__all__ = ["DdddocrTask", "ctc_greedy"]

HEIGHT = 64
WIDTH = 384
_INSTALL_HINT = "pip install --no-deps ddddocr==1.6.1"


def ctc_greedy(scores: np.ndarray, charset: list[str]) -> str:
    """The text of one line's ``[T, C]`` scores: the best class per column, repeats merged, blanks (0) dropped."""
    best = scores.argmax(axis=1)
    kept = best[np.r_[True, best[1:] != best[:-1]]]
    return "".join(charset[k] for k in kept if k != 0)


class DdddocrTask(Task):
    name = "ddddocr"
    metric_names = ("character accuracy",)
    default_test_samples = 150

    @property
    def description(self) -> str:
        return f"ddddocr text reader (beta), character accuracy on {self.test_samples} rendered lines"

    @cached_property
    def package(self) -> Path:
        folder = package_dir("ddddocr")
        if folder is None or not (folder / "common.onnx").is_file():
            raise FileNotFoundError(f"ddddocr is not installed: {_INSTALL_HINT}")
        return folder

    @cached_property
    def charset(self) -> list[str]:
        """The ``beta`` character list, read from ddddocr's ``charsets.py`` without importing the package."""
        return runpy.run_path(str(self.package / "charsets.py"))["CHARSET_BETA"]

    def source(self) -> tuple[Path, Shapes]:
        return self.package / "common.onnx", {"input1": (1, 1, HEIGHT, WIDTH)}

    @staticmethod
    def preprocess(lines: list[TextLine]) -> np.ndarray:
        """float32 ``[n, 1, HEIGHT, WIDTH]`` in [0, 1] (see the module docstring)."""
        images = np.empty((len(lines), 1, HEIGHT, WIDTH), dtype=np.float32)
        for k, line in enumerate(lines):
            image = Image.fromarray(np.ascontiguousarray(line.image[:, :, ::-1]))  # BGR -> RGB
            width = min(WIDTH, round(image.width * HEIGHT / image.height))
            grey = np.asarray(image.resize((width, HEIGHT)).convert("L"), dtype=np.float32)
            images[k, 0] = grey[:, -1:].mean()
            images[k, 0, :, :width] = grey
        return images / 255.0

    @cached_property
    def test_lines(self) -> list[TextLine]:
        return render_lines(self.test_samples, TEST_SEED)

    @cached_property
    def test_inputs(self) -> np.ndarray:
        return self.preprocess(self.test_lines)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        lines = render_lines(samples, CALIBRATION_SEED, exclude={line.text for line in self.test_lines})
        return {"input1": self.preprocess(lines)}

    def recognise(self, path: str | Path) -> list[str]:
        """The text read from each test line by the model at ``path`` (its output is ``[T, batch, C]``)."""
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [ctc_greedy(session.run(None, {name: image[None]})[0][:, 0], self.charset) for image in self.test_inputs]

    def metrics(self, path: str | Path) -> dict[str, float]:
        return {"character accuracy": character_accuracy(self.recognise(path), [line.text for line in self.test_lines])}
