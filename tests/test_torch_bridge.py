"""Back to PyTorch: ``to_torch`` reproduces pruned ONNX models (zoo and a Paddle export) as
trainable modules that export back to equivalent ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.shipped import ppocr_input_shapes, ppocr_model_paths  # noqa: E402
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
    """Also exported with a dynamic batch axis (as the fine-tuning benchmark does): batches of
    other sizes than the traced one give onnxruntime's outputs."""
    from spa_compiler.torch.distill import export_module

    shapes = ppocr_input_shapes()["cls"]
    path, _ = _prune_half(ppocr_model_paths()["cls"], tmp_path, shapes)
    module = _assert_round_trip(path, tmp_path, shapes)
    exported, fixed = export_module(module, onnx.load(str(path)), {"x": np.zeros((2, 3, 48, 192), np.float32)},
                                    tmp_path / "batch.onnx")
    assert fixed == ("x[2]=48", "x[3]=192")  # the trace records one height and width
    batch = np.random.default_rng(3).standard_normal((5, 3, 48, 192)).astype(np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"x": batch})[0]
    np.testing.assert_allclose(ort.InferenceSession(str(exported)).run(None, {"x": batch})[0], expected,
                               rtol=TOLERANCE, atol=TOLERANCE)


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


# --------------------------------------------------------------------------- narrow

def _fresh_layer(layer):
    """A new layer of ``layer``'s class built from its (narrowed) attributes alone."""
    nn = torch.nn
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None)
    if isinstance(layer, nn.ConvTranspose2d):
        return nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.output_padding, layer.groups, layer.bias is not None)
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, nn.BatchNorm2d):
        return nn.BatchNorm2d(layer.num_features, layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return nn.LayerNorm(layer.normalized_shape, layer.eps)
    if isinstance(layer, nn.Embedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim)
    if isinstance(layer, (nn.GRU, nn.LSTM)):
        return type(layer)(layer.input_size, layer.hidden_size, layer.num_layers, bias=layer.bias,
                           bidirectional=layer.bidirectional)
    if isinstance(layer, nn.RNN):
        return nn.RNN(layer.input_size, layer.hidden_size, layer.num_layers, layer.nonlinearity, layer.bias,
                      bidirectional=layer.bidirectional)
    return None


def _rebuilt(module):
    """A deep copy of ``module`` whose every torch layer is freshly constructed from its attributes."""
    import copy

    fresh = copy.deepcopy(module)
    for name, layer in list(fresh.named_modules()):
        replacement = _fresh_layer(layer)
        if replacement is not None and name:
            parent, _, child = name.rpartition(".")
            setattr(fresh.get_submodule(parent) if parent else fresh, child, replacement)
    return fresh.eval()


def _rebuilt_if_vad(module):
    """The zoo's ``IfVAD`` built anew at the narrowed widths and scripted (a TorchScript module's
    ``in_channels``-style constants cannot change, so the widths are read from its weights)."""
    from models.zoo_patterns import IfVAD

    nn = torch.nn
    fresh = IfVAD(32)
    fresh.front = nn.Conv1d(1, module.front.weight.shape[0], 8, stride=4)
    fresh.conv = nn.Conv1d(module.conv.weight.shape[1], module.conv.weight.shape[0], 3, padding=1)
    fresh.head = nn.Linear(module.head.weight.shape[1], 1)
    return torch.jit.script(fresh.eval())


NARROW = ["resnet_tiny_basic", "mobilenet_v3_tiny", "densenet_tiny", "vit_tiny", "gpt2_tiny", "crnn_tiny",
          "if_vad_tiny"]
REBUILD = {"if_vad_tiny": _rebuilt_if_vad}


@pytest.mark.parametrize("name", NARROW)
def test_narrowed_module_equals_the_pruned_model_and_reloads(exported, tmp_path, name):
    from models.zoo import ARCHITECTURES
    from spa_compiler.torch import narrow

    spec = ARCHITECTURES[name]
    path, report = _prune_half(exported(name), tmp_path)
    assert any(g.channels_after < g.channels_before for g in report.groups)
    module = narrow(spec.builder(), report)
    feed_sets = [_feeds(path, seed=5)]
    if name == "if_vad_tiny":  # the If's other branch (the signal scaled up first) runs on a quiet input
        feed_sets.append({key: value * 0.01 for key, value in feed_sets[0].items()})
        assert np.abs(feed_sets[1]["input"]).max() < 0.5 < np.abs(feed_sets[0]["input"]).max()
    fresh = REBUILD.get(name, _rebuilt)(module)
    fresh.load_state_dict(module.state_dict(), strict=True)
    for feeds in feed_sets:
        expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
        np.testing.assert_allclose(_run_torch(module, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)
        np.testing.assert_allclose(_run_torch(fresh, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in spec.builder().parameters())
    if name == "crnn_tiny":
        assert module.gru.hidden_size == module.head.in_features < 48


def test_narrow_reads_the_json_report_and_refuses_a_foreign_module(exported, tmp_path):
    import json

    from models.zoo import resnet_tiny_basic
    from spa_compiler import ModelError
    from spa_compiler.torch import narrow

    _, report = _prune_half(exported("resnet_tiny_basic"), tmp_path)
    saved = tmp_path / "report.json"
    saved.write_text(report.to_json())
    assert json.loads(saved.read_text())["initializers"]
    narrow(resnet_tiny_basic(), saved)
    with pytest.raises(ModelError, match="matches no parameter"):
        narrow(resnet_tiny_basic(seed=1), saved)


def test_narrow_refuses_a_module_whose_code_fixes_the_attention_width(exported, tmp_path):
    """A ViT whose attention reshapes its output to the input's hidden size cannot run with fewer
    heads: narrow updates ``heads`` yet its check against the pruned model fails loudly."""
    from models import zoo
    from spa_compiler import ModelError
    from spa_compiler.torch import narrow

    def fixed_width_forward(self, x):
        b, l, hidden = x.shape
        q, k, v = (t.view(b, l, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x))
        out = (q @ k.transpose(-2, -1) / self.head_dim ** 0.5).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, l, hidden))

    _, report = _prune_half(exported("vit_tiny"), tmp_path)
    heads = [g for g in report.groups if g.kind == "heads" and g.channels_after < g.channels_before]
    assert heads
    module = zoo.vit_tiny()
    for layer in module.modules():
        if isinstance(layer, zoo.SelfAttention):
            layer.forward = fixed_width_forward.__get__(layer)
    with pytest.raises(ModelError, match="no longer runs"):
        narrow(module, report)


@pytest.mark.accurate
def test_rotated_head_dimensions_go_to_torch_through_to_torch_not_narrow(exported, tmp_path):
    """The default pipeline prunes the ViT's rotated head dimensions: its rotated weights are
    reported as changed, narrow refuses (a module's code scales scores by its own head size) and
    says what to do, and to_torch trains the pruned file as it is."""
    from models import zoo
    from spa_compiler import ModelError
    from spa_compiler.torch import narrow

    path, report = _prune_half(exported("vit_tiny"), tmp_path)
    assert report.rotated_heads == 4 and any(g.kind == "head dims" and g.channels_after < g.channels_before
                                             for g in report.groups)
    assert sum(change.compensated for change in report.initializers) >= 4 * 3
    with pytest.raises(ModelError, match="removed head dimensions.*--heads"):
        narrow(zoo.vit_tiny(), report)
    feeds = _feeds(path, seed=5)
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_allclose(_run_torch(to_torch(path), feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_narrow_names_the_layer_that_fails_and_the_width_its_code_fixes(exported, tmp_path):
    """The zoo C2f splits cv1's output by a fixed ``self.hidden``: the narrowed module cannot run,
    and the error names the conv that got the wrong width and the attribute."""
    from models.zoo import yolo_c2f_tiny
    from spa_compiler import ModelError
    from spa_compiler.torch import narrow

    _, report = _prune_half(exported("yolo_c2f_tiny"), tmp_path)
    with pytest.raises(ModelError, match=r"no longer runs in 'features\.4\.blocks\.0\.body\.0\.0' \(Conv2d\).*"
                                         r"'features\.4' \(C2f\) hidden=32"):
        narrow(yolo_c2f_tiny(), report)


def test_narrow_an_untrained_model_whose_folded_biases_are_all_zero(tmp_path):
    """An untrained digits ResNet (BatchNorm at its defaults: every folded bias is zero, so no
    bias can be matched by value) narrows exactly, ready to be trained from scratch."""
    from models.digits import INPUT_SHAPE, digits_resnet
    from models.export import export_onnx
    from spa_compiler.torch import narrow

    source = export_onnx(digits_resnet().eval(), INPUT_SHAPE, tmp_path / "digits.onnx", dynamic_batch=True)
    path, report = _prune_half(source, tmp_path, {"input": INPUT_SHAPE})
    module = narrow(digits_resnet().eval(), report)
    feeds = _feeds(path, {"input": INPUT_SHAPE}, seed=2)
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_allclose(_run_torch(module, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)
    widths = [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert min(widths) < 32 and _rebuilt(module).load_state_dict(module.state_dict(), strict=True)


# --------------------------------------------------------------------------- recurrent layers

class _Recurrent(torch.nn.Module):
    """Bidirectional LSTM -> GRU -> RNN over a [seq, batch, features] input, as the exporter writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 5, bidirectional=True)
        self.gru = torch.nn.GRU(10, 4)
        self.rnn = torch.nn.RNN(4, 3)

    def forward(self, x):
        return self.rnn(self.gru(self.lstm(x)[0])[0])[0]


def test_recurrent_layers_round_trip(tmp_path):
    from models.export import export_checked

    torch.manual_seed(0)
    path = export_checked(_Recurrent().eval(), {"x": torch.randn(7, 2, 6)}, tmp_path / "rnn.onnx")
    _assert_round_trip(path, tmp_path)


def test_narrow_recurrent_layers_by_their_gate_stacked_weights(tmp_path):
    """The LSTM (both directions), GRU and RNN lose hidden units in every gate block and the GRU and
    RNN input features: the narrowed module equals the pruned model and reloads into layers built
    at the new sizes."""
    from models.export import export_checked
    from spa_compiler.torch import narrow

    torch.manual_seed(0)
    source = export_checked(_Recurrent().eval(), {"x": torch.randn(7, 2, 6)}, tmp_path / "rnn.onnx")
    path = tmp_path / "pruned.onnx"
    report = prune(source, path, PruneConfig(flops=0.5, round_to=1, bench_runs=0))
    torch.manual_seed(0)
    module = narrow(_Recurrent().eval(), report)
    sizes = [(layer.input_size, layer.hidden_size) for layer in (module.lstm, module.gru, module.rnn)]
    assert sizes == [(6, 3), (6, 1), (1, 3)]
    feeds = _feeds(path, seed=6)
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    fresh = _rebuilt(module)
    fresh.load_state_dict(module.state_dict(), strict=True)
    for narrowed in (module, fresh):
        np.testing.assert_allclose(_run_torch(narrowed, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)


class _StackedLSTM(torch.nn.Module):
    """Two bidirectional LSTM levels (one ONNX node each, pruned independently) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(6, 16, num_layers=2, bidirectional=True)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_narrow_refuses_levels_of_one_layer_pruned_to_different_widths_and_changes_nothing(tmp_path):
    from models.export import export_checked
    from spa_compiler import ModelError
    from spa_compiler.torch import narrow

    source = export_checked(_StackedLSTM().eval(), {"x": torch.randn(7, 2, 6)}, tmp_path / "stacked.onnx")
    report = prune(source, tmp_path / "pruned.onnx", PruneConfig(flops=0.5, round_to=1, bench_runs=0))
    module = _StackedLSTM().eval()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(ModelError, match="'lstm' would be narrowed to different hidden sizes"):
        narrow(module, report)
    assert all(torch.equal(value, before[key]) for key, value in module.state_dict().items())


def _recurrent_model(path, op, **attributes):
    """One reverse ``op`` node (hidden 5, 3 features, initial state given) with seeded weights."""
    gates, hidden, features = (4 if op == "LSTM" else 3), 5, 3
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in
               (("W", (1, gates * hidden, features)), ("R", (1, gates * hidden, hidden)),
                ("B", (1, 2 * gates * hidden)), ("h0", (1, 2, hidden)), ("c0", (1, 2, hidden)))}
    inputs = ["x", "W", "R", "B", "", "h0"] + (["c0"] if op == "LSTM" else [])
    node = onnx.helper.make_node(op, inputs, ["y", "y_h"], hidden_size=hidden, direction="reverse", **attributes)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 2, features])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 1, 2, hidden])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items() if k in inputs])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return {"x": rng.standard_normal((4, 2, features)).astype(np.float32)}


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_reverse_recurrent_layer_with_initial_state_matches_onnxruntime(tmp_path, op):
    path = tmp_path / "reverse.onnx"
    feeds = _recurrent_model(path, op, **({"linear_before_reset": 1} if op == "GRU" else {}))
    expected = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_allclose(_run_torch(to_torch(path), feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize(("op", "attributes", "named"), [
    ("LSTM", {"clip": 3.0}, "clip"), ("GRU", {}, "linear_before_reset=0"),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
])
def test_recurrent_layer_torch_cannot_express_is_refused_by_name(tmp_path, op, attributes, named):
    path = tmp_path / "refused.onnx"
    _recurrent_model(path, op, **attributes)
    with pytest.raises(UnsupportedModelError, match=named):
        to_torch(path)


def _biased_conv_net():
    """Two conv (with bias) -> BatchNorm -> ReLU layers and a classifier; BatchNorms not at defaults."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("refit", [0, 1])
def test_narrow_slices_a_folded_conv_bias_and_carries_the_re_fit_through_it(tmp_path, refit):
    from models.export import export_onnx
    from spa_compiler.torch import narrow

    source = export_onnx(_biased_conv_net(), (1, 3, 8, 8), tmp_path / "net.onnx")
    output = tmp_path / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.5, round_to=1, refit_rounds=refit, bench_runs=0))
    assert (report.compensated > 0) == bool(refit)
    module = narrow(_biased_conv_net(), report)
    assert module[0].bias.shape[0] == module[0].out_channels < 16
    feeds = _feeds(output, seed=4)
    expected = ort.InferenceSession(str(output)).run(None, feeds)[0]
    np.testing.assert_allclose(_run_torch(module, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)
