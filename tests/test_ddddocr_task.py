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
@pytest.mark.parametrize("flops, loss, lines", [(0.75, 0.05, 40), (0.5, 0.1, 150)])
def test_data_free_keeps_the_accuracy(tmp_path, flops, loss, lines):
    """Pruned data-free to three quarters of its FLOPs, it reads the test lines within 0.05 of
    its character accuracy (0.929 of 0.952 on 150 lines), to half within 0.1 (0.903; on all
    150 lines, as the first 40 are easier: 0.911 of 0.945 before the text lines below). Its
    LSTM's 512 hidden units are all prunable; with the LSTM a barrier, the convolutions lost two
    thirds of their channels for --flops 0.5 and the model read nothing. Its statistics come
    from synthetic text lines as high as its input: with half of them natural pictures and lines
    at most 48 pixels high it read 0.754 at 0.5."""
    from spa_compiler import PruneConfig, analyze, prune

    task = DdddocrTask(test_samples=lines)
    source, shapes = task.source()
    groups = {group.name: len(group.prunable) for group in analyze(source, shapes).groups}
    assert groups["LSTM 'LSTM_79'"] == 512
    unpruned = task.evaluate(source)
    assert unpruned > 0.9
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=flops, input_shapes=shapes, round_to=task.round_to, bench_runs=0))
    assert "256 text pictures" in report.calibration and "text alone: shaped like a text line (384x64)" in report.calibration
    assert report.flops_ratio <= flops + 0.01
    assert task.evaluate(output) >= unpruned - loss
