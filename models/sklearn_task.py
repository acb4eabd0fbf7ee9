"""Accuracy task: a scikit-learn pipeline exported by skl2onnx, as scikit-learn users ship one.

``StandardScaler`` then ``MLPClassifier((512, 256))`` trained on scikit-learn's digits (the 8x8
images as 64 pixel values 0 to 16; the split of ``models.digits.load_digits_split``: 1,437
training and 360 test images, seed 0), converted with ``skl2onnx.to_onnx`` and its defaults: an
``ai.onnx.ml`` ``Scaler``, the MatMul/Add/Relu layers, a Softmax, the predicted label, and the
probabilities as a ``ZipMap`` (a sequence of maps from class to probability), the two outputs
scikit-learn's ``predict`` and ``predict_proba`` give. Metric: **accuracy** of the label output.
Calibration images are the training images. Needs scikit-learn and skl2onnx (the ``bench`` and
``test`` extras).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .tasks import Shapes, Task

__all__ = ["SklearnTask", "digits_pixels"]

HIDDEN = (512, 256)


def digits_pixels() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``: the digits as float32 ``[N, 64]`` pixel values 0
    to 16 and int64 labels, split 80/20 with ``random_state=0`` (as ``models.digits``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target.astype(np.int64), test_size=0.2, random_state=0)
    return x_train, x_test, y_train, y_test


class SklearnTask(Task):
    name = "sklearn"
    metric_names = ("accuracy",)
    default_test_samples = 360

    @property
    def description(self) -> str:
        return (f"scikit-learn MLP {HIDDEN} through skl2onnx (labels and a ZipMap), digits accuracy on "
                f"{self.test_samples} test images")

    @cached_property
    def data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return digits_pixels()

    @cached_property
    def model_path(self) -> Path:
        """The trained pipeline converted by skl2onnx (seed 0), written once per task instance."""
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from skl2onnx import to_onnx

        x_train, _, y_train, _ = self.data
        pipeline = make_pipeline(StandardScaler(), MLPClassifier(HIDDEN, max_iter=400, random_state=0))
        pipeline.fit(x_train, y_train)
        path = self.folder / "sklearn_mlp.onnx"
        path.write_bytes(to_onnx(pipeline, x_train[:1], target_opset=17).SerializeToString())
        return path

    def source(self) -> tuple[Path, Shapes]:
        return self.model_path, {"X": (1, 64)}

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return {"X": self.data[0][:samples]}

    def metrics(self, path: str | Path) -> dict[str, float]:
        _, x_test, _, y_test = self.data
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        labels = session.run(["output_label"], {"X": x_test[: self.test_samples]})[0]
        return {"accuracy": float(np.mean(labels == y_test[: self.test_samples]))}
