"""ddddocr's text reader (a PyTorch export whose LSTM starts from ``ConstantOfShape`` zeros of a
run-time shape): its hidden units prune with the LSTM, so a target need not fall on the
convolutions alone."""

from __future__ import annotations

import numpy as np
import pytest

from models.ddddocr_task import DdddocrTask, ctc_greedy
from models.shipped import package_dir


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    charset = ["", "a", "b"]
    columns = [1, 1, 0, 1, 2, 2, 0, 0, 2]  # a a _ a b b _ _ b
    scores = np.eye(3, dtype=np.float32)[columns]
    assert ctc_greedy(scores, charset) == "aabb"


@pytest.mark.accurate
@pytest.mark.skipif(package_dir("ddddocr") is None, reason="pip install --no-deps ddddocr==1.6.1")
def test_data_free_three_quarters_keeps_the_accuracy(tmp_path):
    """Pruned data-free to three quarters of its FLOPs, it reads the test lines as well as
    before, within 0.05 of its character accuracy (0.938 of 0.952 on 150 lines). Its LSTM's
    512 hidden units are all prunable; with the LSTM a barrier, the convolutions lost two thirds
    of their channels for --flops 0.5 and the model read nothing."""
    from spa_compiler import PruneConfig, analyze, prune

    task = DdddocrTask(test_samples=40)
    source, shapes = task.source()
    groups = {group.name: len(group.prunable) for group in analyze(source, shapes).groups}
    assert groups["LSTM 'LSTM_79'"] == 512
    unpruned = task.evaluate(source)
    assert unpruned > 0.9
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.75, input_shapes=shapes, round_to=task.round_to))
    assert report.flops_ratio <= 0.76
    assert task.evaluate(output) >= unpruned - 0.05
