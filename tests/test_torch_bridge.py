"""Back to PyTorch: ``to_torch`` reproduces pruned ONNX models (zoo and a Paddle export) as
trainable modules that export back to equivalent ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.real import ppocr_input_shapes, ppocr_model_paths  # noqa: E402
from spa_compiler import PruneConfig, UnsupportedModelError, load_model, prune, synthetic_inputs  # noqa: E402
from spa_compiler.torch import to_torch  # noqa: E402

TOLERANCE = 1e-4
ZOO = ["resnet_tiny_basic", "mobilenet_v3_tiny", "unet_tiny", "vit_tiny", "gpt2_tiny"]


def _prune_half(source, folder, input_shapes=None):
    output = folder / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.5, bench_runs=0, input_shapes=input_shapes or {}))
    return output, report


def _feeds(path, input_shapes=None, seed=0):
    graph = load_model(path, input_shapes)
    return synthetic_inputs(graph.input_shapes, graph.dtypes, seed)


def _run_torch(module, feeds):
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return (out if isinstance(out, (tuple, list)) else [out])[0].numpy()


def _assert_round_trip(path, folder, input_shapes=None):
    """to_torch(path) matches onnxruntime, and so does torch.onnx.export of the module."""
    feeds = _feeds(path, input_shapes)
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    module = to_torch(path)
    np.testing.assert_allclose(_run_torch(module, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)
    exported = folder / "back.onnx"
    torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feeds.values()), str(exported), dynamo=False,
                      opset_version=17, input_names=list(feeds))
    onnx.checker.check_model(str(exported), full_check=True)
    again = ort.InferenceSession(str(exported)).run(None, feeds)[0]
    np.testing.assert_allclose(again, expected, rtol=TOLERANCE, atol=TOLERANCE)
    return module


@pytest.mark.parametrize("name", ZOO)
def test_pruned_zoo_model_round_trips_through_torch(exported, tmp_path, name):
    path, report = _prune_half(exported(name), tmp_path)
    assert report.flops_ratio <= 0.52
    module = _assert_round_trip(path, tmp_path)
    weights = [t for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1]
    if name != "unet_tiny":  # its Resize scales are the one float tensor that stays a buffer
        assert sum(p.numel() for p in module.parameters()) == sum(int(np.prod(t.dims)) for t in weights)


@pytest.mark.real_model
def test_pruned_paddle_classifier_round_trips_through_torch(tmp_path):
    shapes = ppocr_input_shapes()["cls"]
    path, _ = _prune_half(ppocr_model_paths()["cls"], tmp_path, shapes)
    _assert_round_trip(path, tmp_path, shapes)


def test_converted_module_trains(exported, tmp_path):
    """Weights kept outside torch layers (attention MatMuls, position embeddings) are parameters:
    one SGD step on the converted ViT moves them and the output."""
    module = to_torch(exported("vit_tiny")).train()
    x = torch.from_numpy(_feeds(exported("vit_tiny"))["input"])
    named = dict(module.named_parameters())
    matmul_weights = [name for name, p in named.items() if name.startswith("initializers.") and p.ndim == 2]
    assert len(matmul_weights) >= 8  # q, k, v, output projections of two blocks at least
    before = {name: p.detach().clone() for name, p in named.items()}
    loss = module(x).square().sum()
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=1e-2).step()
    moved = [name for name, p in named.items() if not torch.equal(p.detach(), before[name])]
    assert set(matmul_weights) <= set(moved)


def test_unknown_op_is_refused_by_name(tmp_path):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[1, 4] x) => (float[1, 4] y) { y = com.example.Mystery(x) }
    """)
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedModelError, match="Mystery"):
        to_torch(path)
