"""Back to PyTorch through control flow: ``to_torch`` converts If, Loop and Scan (each subgraph a module
reading the outer values it needs), pruned models with them equal onnxruntime, the weights the
subgraphs read train, and ``torch.onnx.export`` gives back the traced path (one branch, unrolled loops).

Models: the zoo's ``if_vad_tiny`` (an If around the whole network, both branches reading the same outer
weights), and Loop and Scan patterns like those of test_op_rules_control, each pruned at ``--flops 0.5``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from spa_compiler import PruneConfig, UnsupportedModelError, prune  # noqa: E402
from spa_compiler.torch import to_torch  # noqa: E402
from test_op_rules import make_model  # noqa: E402
from test_torch_bridge import TOLERANCE, _feeds  # noqa: E402

# Loop: a carried value made by a Conv before it, a body with two Convs, a scan output summed over
# the iterations. The trip count allows 3 iterations, the body's condition (i < 1) stops after 2.
LOOP_MODEL = """g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {
    a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    l, s = Loop (trip, cond0, a) <body = body_g (int64 i, bool cin, float[1,8,8,8] carried) => (bool cout, float[1,8,8,8] next, float[1,8,8,8] each) {
        cout = Less (i, limit)
        h = Conv <pads = [1, 1, 1, 1]> (carried, Wa)
        hr = Relu (h)
        next = Conv (hr, Wb, Bb)
        each = Relu (next)
    }>
    y = Conv (l, W2)
    t = ReduceSum <keepdims = 0> (s, axis0)
    z = Conv (t, W3)
}"""
LOOP_CONSTS = {"W1": (8, 3, 3, 3), "B1": (8,), "trip": np.asarray(3, dtype=np.int64), "cond0": np.asarray(True),
               "limit": np.asarray(1, dtype=np.int64), "Wa": (16, 8, 3, 3), "Wb": (8, 16, 1, 1), "Bb": (8,),
               "W2": (4, 8, 1, 1), "W3": (4, 8, 1, 1), "axis0": np.asarray([0], dtype=np.int64)}

# Scan: a recurrence s_t = tanh(s_{t-1} R + x_t A) over the reversed sequence, features from a MatMul.
SCAN_MODEL = """g (float[5,6] x) => (float[5,3] y, float[3] z) {
    a = MatMul (x, A)
    sfinal, ys = Scan (s0, a) <num_scan_inputs = 1, scan_input_directions = [1], body = body_g (float[8] sin, float[8] at) => (float[8] sout, float[8] yt) {
        r = MatMul (sin, R)
        p = Add (r, at)
        sout = Tanh (p)
        yt = Relu (sout)
    }>
    y = MatMul (ys, W2)
    z = MatMul (sfinal, W3)
}"""
SCAN_CONSTS = {"A": (6, 8), "s0": (8,), "R": (8, 8), "W2": (8, 3), "W3": (8, 3)}


def _pruned(source, folder):
    output = folder / "pruned.onnx"
    report = prune(source, output, PruneConfig(flops=0.5, bench_runs=0))
    assert report.flops_ratio <= 0.52
    return output


def _saved(folder, text, consts, opset=13):
    path = folder / "model.onnx"
    onnx.save(make_model(text, opset, consts), str(path))
    return path


def _outputs(module, feeds):
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]


def _assert_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=TOLERANCE, atol=TOLERANCE)


def _export(module, feeds, path):
    torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feeds.values()), str(path), dynamo=False,
                      opset_version=17, input_names=list(feeds))
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path))


def _assert_subgraph_weights_train(module, pruned_path, feeds):
    """Every float weight of the pruned model is one parameter (tied where several subgraphs read
    it), and a backward pass from the outputs gives each of them a non-zero gradient."""
    weights = [t for t in onnx.load(str(pruned_path)).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1]
    parameters = dict(module.named_parameters())
    assert sum(p.numel() for p in parameters.values()) == sum(int(np.prod(t.dims)) for t in weights)
    module.train()
    outputs = module(*(torch.from_numpy(v) for v in feeds.values()))
    sum(o.square().sum() for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs])).backward()
    silent = [name for name, p in parameters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


@pytest.fixture(scope="module")
def if_vad(exported, tmp_path_factory):
    return _pruned(exported("if_vad_tiny"), tmp_path_factory.mktemp("if_vad"))


def _vad_input(quiet: bool) -> dict[str, np.ndarray]:
    """Seeded audio; quiet (peak below 0.5) takes the If's then branch, which scales the signal by 4."""
    x = np.random.default_rng(5).uniform(-1.0, 1.0, (1, 1, 512)).astype(np.float32)
    return {"input": x * 0.3 if quiet else x}


@pytest.mark.parametrize("quiet", [True, False], ids=["then", "else"])
def test_pruned_if_model_equals_onnxruntime_on_each_branch(if_vad, quiet):
    feeds = _vad_input(quiet)
    assert (np.abs(feeds["input"]).max() < 0.5) == quiet
    module = to_torch(if_vad)
    assert sorted(m.__class__.__name__ for m in module.modules() if m.__class__.__name__ == "If") == ["If"]
    _assert_equal(_outputs(module, feeds), ort.InferenceSession(str(if_vad)).run(None, feeds))


def test_if_branch_weights_are_shared_parameters_and_train(if_vad):
    """Both branches read the same outer weights: one parameter each, gradients through the branch taken."""
    module = to_torch(if_vad)
    for quiet in (True, False):
        module.zero_grad()
        _assert_subgraph_weights_train(module, if_vad, _vad_input(quiet))


def test_if_re_export_keeps_the_traced_branch(if_vad, tmp_path):
    """Tracing records the branch the example input takes: the re-exported model has no If and
    equals onnxruntime on inputs taking that branch (the exported one, and another quiet input),
    not on the other branch's inputs."""
    quiet = _vad_input(True)
    session = _export(to_torch(if_vad), quiet, tmp_path / "back.onnx")
    assert "If" not in {n.op_type for n in onnx.load(str(tmp_path / "back.onnx")).graph.node}
    original = ort.InferenceSession(str(if_vad))
    _assert_equal(session.run(None, quiet), original.run(None, quiet))
    other_quiet = {"input": (quiet["input"][:, :, ::-1] * 0.5).copy()}
    _assert_equal(session.run(None, other_quiet), original.run(None, other_quiet))
    loud = _vad_input(False)
    assert np.abs(session.run(None, loud)[0] - original.run(None, loud)[0]).max() > 1e-3


LOOP_FORMS = {  # how the Loop's first two inputs are written; the body's condition stops every form after 2
    "loop": "Loop (trip, cond0, a)",
    "loop_without_condition_input": 'Loop (trip, "", a)',  # onnxruntime still honours the body's condition
    "loop_without_trip_count": 'Loop ("", cond0, a)',
}


@pytest.mark.parametrize("model", [*LOOP_FORMS, "scan"])
def test_pruned_loop_and_scan_round_trip(tmp_path, model):
    """Outputs (final carried values or states, and stacked scan outputs) equal onnxruntime's, the
    weights the bodies read get gradients, and the re-export (unrolled for this iteration count,
    which here does not depend on the input) equals onnxruntime too."""
    text, consts = (SCAN_MODEL, SCAN_CONSTS) if model == "scan" else (LOOP_MODEL, LOOP_CONSTS)
    text = text.replace(LOOP_FORMS["loop"], LOOP_FORMS.get(model, LOOP_FORMS["loop"]))
    path = _pruned(_saved(tmp_path, text, consts), tmp_path)
    feeds = _feeds(path, seed=1)
    expected = ort.InferenceSession(str(path)).run(None, feeds)
    module = to_torch(path)
    _assert_equal(_outputs(module, feeds), expected)
    _assert_subgraph_weights_train(module, path, feeds)
    session = _export(module.eval(), feeds, tmp_path / "back.onnx")
    _assert_equal(session.run(None, feeds), expected)


def test_nested_if_in_loop_with_weights_local_to_each_branch(tmp_path):
    """An If inside a Loop body, alternating branches by iteration; each branch holds its own weight
    named ``W`` (different values, so they stay in their subgraphs): each becomes a parameter of its
    branch's module, trains, and the outputs equal onnxruntime's."""
    text = """g (float[2,4] x) => (float[2,4] y) {
        y = Loop (trip, cond0, x) <body = body_g (int64 i, bool cin, float[2,4] v) => (bool cout, float[2,4] next) {
            cout = Identity (cin)
            parity = Mod (i, two)
            odd = Equal (parity, one)
            next = If (odd) <then_branch = then_g () => (float[2,4] a) {
                m = MatMul (v, W)
                a = Tanh (m)
            }, else_branch = else_g () => (float[2,4] b) {
                b = MatMul (v, W)
            }>
        }>
    }"""
    model = make_model(text, 13, {"trip": np.asarray(3, dtype=np.int64), "cond0": np.asarray(True),
                                  "two": np.asarray(2, dtype=np.int64), "one": np.asarray(1, dtype=np.int64)})
    branches = model.graph.node[0].attribute[0].g.node[-1].attribute
    for seed, branch in enumerate(branches):
        branch.g.initializer.append(onnx.numpy_helper.from_array(
            np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32), "W"))
    path = tmp_path / "nested.onnx"
    onnx.save(model, str(path))
    feeds = {"x": np.random.default_rng(7).standard_normal((2, 4)).astype(np.float32)}
    module = to_torch(path)
    _assert_equal(_outputs(module, feeds), ort.InferenceSession(str(path)).run(None, feeds))
    parameters = dict(module.named_parameters())
    assert sorted(name.split(".")[3] for name in parameters) == ["else_branch", "then_branch"]  # Loop.body.If.<branch>
    module(torch.from_numpy(feeds["x"])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters.values())


def test_scan_of_opset_8_is_refused_by_name(tmp_path):
    text = """g (float[1,5,4] x) => (float[1,4] s) {
        s, ys = Scan ("", s0, x) <num_scan_inputs = 1, body = body_g (float[4] sin, float[4] xt) => (float[4] sout, float[4] yt) {
            sout = Add (sin, xt)
            yt = Identity (sout)
        }>
    }"""
    path = tmp_path / "scan8.onnx"
    onnx.save(make_model(text, 8, {"s0": np.zeros((1, 4), np.float32)}), str(path))
    with pytest.raises(UnsupportedModelError, match="Scan"):
        to_torch(path)
