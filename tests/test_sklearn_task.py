"""A scikit-learn pipeline exported by skl2onnx (``models.sklearn_task``): an ``ai.onnx.ml``
Scaler in front, the probabilities as a ZipMap, a sequence of maps, beside the labels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.sklearn_task import SklearnTask


@pytest.mark.accurate
def test_data_free_keeps_the_accuracy_and_the_outputs(tmp_path):
    """Pruned data-free to 0.3 of its FLOPs it loses at most 0.025 of its test accuracy (0.961
    of 0.975; 0.942 when the features were standard normal instead of the Scaler's inverse of
    them, and the ZipMap output made the pruning fail). The pruned file has the labels and the
    maps, in that order, the maps' arg-max the label."""
    from spa_compiler import PruneConfig, prune

    task = SklearnTask()
    source, shapes = task.source()
    unpruned = task.evaluate(source)
    assert unpruned > 0.95
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.3, input_shapes=shapes, round_to=task.round_to))
    assert report.flops_ratio <= 0.31
    assert "inverse of its Scaler" in report.calibration
    assert task.evaluate(output) >= unpruned - 0.025
    pruned = onnx.load(output)
    assert [value.name for value in pruned.graph.output] == ["output_label", "output_probability"]
    labels, maps = ort.InferenceSession(str(output)).run(None, {"X": task.data[1][:20]})
    assert [max(m, key=m.get) for m in maps] == labels.tolist()
    assert np.all(labels >= 0)
