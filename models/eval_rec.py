"""An ``--eval`` script: the PP-OCRv4 recogniser's character accuracy on 150 rendered text lines.

``spa-prune rec.onnx --flops 0.5 --input-shape x=1x3x48x320 --eval models/eval_rec.py`` (run from
the repository, which holds ``models``; needs ``rapidocr-onnxruntime``). The lines are rendered
from a fixed seed, disjoint from the calibration lines of ``models.ocr_tasks``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ocr_tasks import RecTask  # noqa: E402

_TASK = RecTask()


def score(model_path: str) -> float:
    """Character accuracy of the model at ``model_path``: the mean over lines of
    ``1 - min(1, edit_distance / length)``, spaces removed (``models.ocr_tasks.character_accuracy``)."""
    return _TASK.evaluate(model_path)
