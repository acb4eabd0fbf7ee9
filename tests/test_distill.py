"""``spa-prune distill``: a pruned model trained toward its original's outputs on unlabelled
inputs, written only when its held-out error falls and its export reproduces the trained module."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.export import export_onnx  # noqa: E402
from models.zoo import ARCHITECTURES  # noqa: E402
from spa_compiler import PruneConfig, prune  # noqa: E402
from spa_compiler.torch.distill import distill, distillation_loss  # noqa: E402
from tests.test_cli import assert_one_line_error, run_cli, snapshot  # noqa: E402

SAMPLES = 96


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """gpt2_tiny with a free batch axis, pruned to half its FLOPs, and 96 seeded token sequences."""
    folder = tmp_path_factory.mktemp("distill")
    spec = ARCHITECTURES["gpt2_tiny"]
    source = export_onnx(spec.builder(), spec.input_shape, folder / "gpt2.onnx", dynamic_batch=True,
                         input_dtype=spec.input_dtype)
    pruned = folder / "pruned.onnx"
    prune(source, pruned, PruneConfig(flops=0.5, bench_runs=0))
    data = folder / "ids.npz"
    np.savez(data, input=np.random.default_rng(1).integers(0, 64, (SAMPLES, 32)).astype(np.int64))
    return source, pruned, data


def test_distillation_loss_is_relative_and_counts_real_tokens_only():
    """Σ_o Σ m ‖y − y*‖² / Σ m ‖y*‖²: padding does not count, each output relative to its size."""
    teacher = [torch.ones(2, 4, 3), torch.full((2, 5), 10.0)]
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    outputs = [t.clone() for t in teacher]
    outputs[0][0, 2:] += 5.0  # padding: free
    outputs[0][1, 1] += 2.0  # one real token of five, every feature off by 2: 12 / 15
    outputs[1][0, 0] += 10.0  # one value of ten, at 100 each: 100 / 1000 (no mask on [2, 5])
    assert distillation_loss(outputs, teacher, mask).item() == pytest.approx(12 / 15 + 100 / 1000, rel=1e-6)
    assert distillation_loss(teacher, teacher, mask).item() == 0.0


def _relative_error(model, teacher, ids):
    """Σ ‖y − y*‖² / Σ ‖y*‖² over the outputs, computed independently of the library."""
    y = ort.InferenceSession(str(model)).run(None, {"input": ids})
    target = ort.InferenceSession(str(teacher)).run(None, {"input": ids})
    return sum(float(((a - b) ** 2).sum() / (b**2).sum()) for a, b in zip(y, target))


def test_distilled_model_is_closer_to_the_original_on_held_out_samples(gpt2, tmp_path):
    """12 epochs at lr 1e-3 on 84 sequences and their copies: the held-out error (12 sequences)
    falls by at least half (measured 0.0064 -> 0.0021; 0.0035 without the copies), and the
    figures are those of the written file."""
    source, pruned, data = gpt2
    output = tmp_path / "distilled.onnx"
    result = distill(pruned, source, data, output, epochs=12, learning_rate=1e-3)
    assert (result.written, result.samples, result.held_out, result.fixed_axes) == ("distilled", 84, 12, ())
    assert result.after <= 0.5 * result.before, result
    held_out = np.load(data)["input"][-12:]
    assert _relative_error(output, source, held_out) == pytest.approx(result.after, rel=1e-4)
    assert _relative_error(pruned, source, held_out) == pytest.approx(result.before, rel=1e-4)
    onnx.checker.check_model(str(output), full_check=True)
    assert ort.InferenceSession(str(output)).get_inputs()[0].shape[0] != 1  # the samples' axis stays free


def test_few_token_sequences_are_topped_up_with_copies(gpt2, tmp_path):
    """84 training sequences (fewer than 1024) get 8 copies each with tokens replaced: 756
    samples, 24 batches per epoch; the 12 held-out sequences are not copied. Without copies, 3
    batches per epoch."""
    source, pruned, data = gpt2
    for token_copies, copies, batches in ((True, 672, 24), (False, 0, 3)):
        totals = set()
        result = distill(pruned, source, data, tmp_path / "out.onnx", epochs=1, learning_rate=1e-4,
                         progress=lambda step, total, loss: totals.add(total), token_copies=token_copies)
        assert (result.samples, result.copies, result.held_out, totals) == (84, copies, 12, {batches})
        assert ("672 copies with 40% of their tokens replaced" in result.summary) == token_copies


def test_a_worse_model_is_not_written(gpt2, tmp_path):
    """A learning rate of 10 wrecks the model: the pruned model is written unchanged."""
    source, pruned, data = gpt2
    output = tmp_path / "out.onnx"
    result = distill(pruned, source, data, output, epochs=1, learning_rate=10.0)
    assert result.written == "pruned" and not result.after < result.before
    assert "the pruned model is written unchanged" in result.summary
    assert onnx.load(str(output)).graph == onnx.load(str(pruned)).graph


def test_model_declaring_a_batch_of_one_trains_on_batches(exported, tmp_path):
    """The zoo's ResNet declares a batch of 1 but computes each image on its own: 21 training
    images make one batch, one step per epoch; a valid model comes out with the pruned model's
    interface, its batch of 1 kept."""
    source = exported("resnet_tiny_basic")
    pruned = tmp_path / "pruned.onnx"
    prune(source, pruned, PruneConfig(flops=0.5, bench_runs=0))
    data = tmp_path / "images.npz"
    np.savez(data, input=np.random.default_rng(2).standard_normal((24, 3, 32, 32)).astype(np.float32))
    output = tmp_path / "out.onnx"
    steps = []
    result = distill(pruned, source, data, output, epochs=8, learning_rate=1e-3,
                     progress=lambda step, total, loss: steps.append((step, total)))
    assert (result.samples, result.held_out, result.copies) == (21, 3, 0)
    assert steps == [(k, 8) for k in range(1, 9)]
    assert result.written == "distilled" and result.after < result.before, result
    shapes = [i.shape for i in ort.InferenceSession(str(output)).get_inputs()]
    assert shapes == [i.shape for i in ort.InferenceSession(str(pruned)).get_inputs()] == [[1, 3, 32, 32]]


def _two_layer_model(weights: list[np.ndarray], batch: int | str, reshape: bool) -> onnx.ModelProto:
    """x[batch, 8] -> MatMul -> Relu -> (Reshape to [batch, -1], or [1, -1] for a free batch: any
    other batch fails or merges samples) -> MatMul -> y[batch, 4]."""
    h = onnx.helper
    nodes = [h.make_node("MatMul", ["x", "w0"], ["a"]), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Reshape", ["r", "shape"], ["f"]) if reshape else h.make_node("Identity", ["r"], ["f"]),
             h.make_node("MatMul", ["f", "w1"], ["y"])]
    initializers = [onnx.numpy_helper.from_array(w, name) for w, name in zip(weights, ("w0", "w1"))]
    rows = batch if isinstance(batch, int) and batch > 0 else 1
    initializers.append(onnx.numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), "shape"))
    graph = h.make_graph(nodes, "two_layers", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4])], initializers)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _teacher_and_student(folder, batch: int | str, reshape: bool):
    """The two-layer model, and a student with its weights plus noise; 24 seeded samples."""
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)]
    teacher, student, data = folder / "teacher.onnx", folder / "student.onnx", folder / "x.npz"
    onnx.save(_two_layer_model(weights, batch, reshape), str(teacher))
    noisy = [w + 0.3 * rng.standard_normal(w.shape).astype(np.float32) for w in weights]
    onnx.save(_two_layer_model(noisy, batch, reshape), str(student))
    np.savez(data, x=rng.standard_normal((24, 8)).astype(np.float32))
    return teacher, student, data


def test_model_that_cannot_batch_trains_one_sample_at_a_time(tmp_path):
    """A Reshape to [1, -1] fixes the batch: 21 samples, 21 steps per epoch; the student comes
    closer to the teacher."""
    teacher, student, data = _teacher_and_student(tmp_path, 1, reshape=True)
    steps = []
    result = distill(student, teacher, data, tmp_path / "out.onnx", epochs=2, learning_rate=1e-2,
                     progress=lambda step, total, loss: steps.append(total))
    assert steps == [42] * 42
    assert result.written == "distilled" and result.after < 0.8 * result.before, result


@pytest.mark.parametrize("reshape, steps", [(True, 5), (False, 1)])
def test_model_declaring_a_batch_of_four_keeps_it(tmp_path, reshape, steps):
    """A model exported with 4 samples: with a Reshape to [4, -1] it trains on batches of exactly
    4 (21 training samples: 5 steps an epoch, one sample left out), else on batches of any size
    (one step); either way the distilled model declares a batch of 4 and comes closer to the
    teacher on the 3 held-out samples, run topped up to 4."""
    teacher, student, data = _teacher_and_student(tmp_path, 4, reshape=reshape)
    output, totals = tmp_path / "out.onnx", []
    result = distill(student, teacher, data, output, epochs=8, learning_rate=1e-2,
                     progress=lambda step, total, loss: totals.append(total))
    assert totals == [8 * steps] * (8 * steps)
    assert (result.samples, result.held_out) == (21, 3)
    assert result.written == "distilled" and result.after < 0.8 * result.before, result
    session = ort.InferenceSession(str(output))
    assert session.get_inputs()[0].shape == [4, 8] and session.get_outputs()[0].shape == [4, 4]
    x = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == (4, 4)


def test_inputs_and_outputs_named_by_numbers_keep_their_names(tmp_path):
    """The TorchScript exporter names outputs it was not told to name by numbers ("44"), which the
    tracer refuses as names: the distilled model is traced under other names and renamed, its
    input "0" and output "7" as the pruned model's, though the trace numbers its own tensors too."""
    teacher, student, data = _teacher_and_student(tmp_path, "N", reshape=False)
    for path in (teacher, student):
        model = onnx.load(str(path))
        for node in model.graph.node:
            node.input[:] = ["0" if name == "x" else name for name in node.input]
            node.output[:] = ["7" if name == "y" else name for name in node.output]
        model.graph.input[0].name, model.graph.output[0].name = "0", "7"
        onnx.save(model, str(path))
    np.savez(data, **{"0": np.load(data)["x"]})
    output = tmp_path / "out.onnx"
    result = distill(student, teacher, data, output, epochs=4, learning_rate=1e-2)
    assert result.written == "distilled" and result.after < 0.8 * result.before, result
    session = ort.InferenceSession(str(output))
    assert [i.name for i in session.get_inputs()] == ["0"] and [o.name for o in session.get_outputs()] == ["7"]
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    assert session.run(None, {"0": x})[0].shape == (5, 4)


def test_batch_declared_as_minus_one_stays_free(tmp_path):
    """Paddle's exporter declares a free batch as -1: the distilled model's stays free."""
    teacher, student, data = _teacher_and_student(tmp_path, -1, reshape=False)
    output = tmp_path / "out.onnx"
    result = distill(student, teacher, data, output, epochs=4, learning_rate=1e-2)
    assert result.written == "distilled" and result.after < 0.8 * result.before, result
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    assert ort.InferenceSession(str(output)).run(None, {"x": x})[0].shape == (5, 4)


def _bert_vocabulary_encoder(path, length: int | str, rng: np.random.Generator, noise: float = 0.0,
                             reshaped_to: int | None = None):
    """ids[N, length] -> rows of a 30522-row table whose number words, months, weekdays and
    colours share a direction (spa-prune recognises the BERT uncased vocabulary) -> MatMul 16x32
    -> Relu -> MatMul 32x16, times the attention mask; weights of ``rng`` plus ``noise``. With
    ``reshaped_to``, the output is reshaped to ``[-1, reshaped_to, 16]``: the model runs only at
    that length, whatever its inputs declare."""
    from spa_compiler.known_text import BERT_UNCASED

    h = onnx.helper
    table = rng.standard_normal((BERT_UNCASED.rows, 16)).astype(np.float32)
    for ids in BERT_UNCASED.kinds.values():
        table[list(ids)] += 4 * rng.standard_normal(16).astype(np.float32)
    weights = [rng.standard_normal((16, 32)).astype(np.float32) / 4, rng.standard_normal((32, 16)).astype(np.float32) / 6]
    weights = [w + noise * rng.standard_normal(w.shape).astype(np.float32) for w in weights]
    nodes = [h.make_node("Gather", ["table", "input_ids"], ["rows"]), h.make_node("MatMul", ["rows", "w0"], ["a"]),
             h.make_node("Relu", ["a"], ["r"]), h.make_node("MatMul", ["r", "w1"], ["b"]),
             h.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
             h.make_node("Unsqueeze", ["m", "last"], ["mc"]), h.make_node("Mul", ["b", "mc"], ["y"])]
    if reshaped_to:
        nodes[-1].output[0] = "masked"
        nodes.append(h.make_node("Reshape", ["masked", "baked"], ["y"]))
    inputs = [h.make_tensor_value_info(n, onnx.TensorProto.INT64, ["N", length]) for n in ("input_ids", "attention_mask")]
    initializers = [onnx.numpy_helper.from_array(a, n) for a, n in
                    ((table, "table"), (weights[0], "w0"), (weights[1], "w1"), (np.array([-1]), "last"),
                     (np.array([-1, reshaped_to or 1, 16]), "baked"))]
    graph = h.make_graph(nodes, "encoder", inputs, [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                         initializers)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_without_data_a_bert_vocabulary_model_trains_on_the_shipped_sentences(tmp_path):
    """No --data: the 640 shipped sentences (560 trained on, 80 held out), truncated to the 12
    tokens the model takes; the student comes closer to the teacher."""
    from spa_compiler.known_text import SHIPPED

    teacher = _bert_vocabulary_encoder(tmp_path / "teacher.onnx", 12, np.random.default_rng(5))
    student = _bert_vocabulary_encoder(tmp_path / "student.onnx", 12, np.random.default_rng(5), noise=0.05)
    result = distill(student, teacher, None, tmp_path / "out.onnx", epochs=2, learning_rate=1e-2, token_copies=False)
    assert (result.data, result.samples, result.held_out, result.copies) == (SHIPPED, 560, 80, 0)
    assert result.written == "distilled" and result.after < 0.8 * result.before, result
    assert f"560 samples ({SHIPPED})" in result.summary


def test_without_data_a_free_sequence_axis_is_bound(tmp_path):
    """A free sequence axis takes the longest shipped sentence (41 ids), or --input-shape's
    size, to train on; the distilled model keeps it free: on 7 tokens it gives what it gives
    on the first 7 of 41 (the encoder is per token), within 1e-5."""
    teacher = _bert_vocabulary_encoder(tmp_path / "teacher.onnx", "T", np.random.default_rng(6))
    student = _bert_vocabulary_encoder(tmp_path / "student.onnx", "T", np.random.default_rng(6), noise=0.05)
    longest = distill(student, teacher, None, tmp_path / "a.onnx", epochs=1, learning_rate=1e-2, token_copies=False)
    assert (longest.written, longest.fixed_axes) == ("distilled", ()), longest
    session = ort.InferenceSession(str(tmp_path / "a.onnx"))
    assert [i.shape[1] for i in session.get_inputs()] == ["T", "T"]
    ids = np.random.default_rng(7).integers(1000, 2000, (3, 41))
    full = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    short = session.run(None, {"input_ids": ids[:, :7], "attention_mask": np.ones_like(ids[:, :7])})[0]
    assert short.shape == (3, 7, 16)
    np.testing.assert_allclose(short, full[:, :7], atol=1e-5)
    bound = distill(student, teacher, None, tmp_path / "b.onnx", epochs=1, learning_rate=1e-2, token_copies=False,
                    input_shapes={"input_ids": (1, 24), "attention_mask": (1, 24)})
    assert (bound.written, bound.fixed_axes) == ("distilled", ()), bound


def test_an_axis_the_model_cannot_change_is_fixed_and_said(tmp_path):
    """A model declaring a free sequence axis that runs at one length only (a Reshape to 41
    tokens): its export on half the tokens fails, so the distilled model fixes the axis to the
    data's 41 and says so."""
    teacher = _bert_vocabulary_encoder(tmp_path / "teacher.onnx", "T", np.random.default_rng(6), reshaped_to=41)
    student = _bert_vocabulary_encoder(tmp_path / "student.onnx", "T", np.random.default_rng(6), noise=0.05,
                                       reshaped_to=41)
    result = distill(student, teacher, None, tmp_path / "a.onnx", epochs=1, learning_rate=1e-2, token_copies=False)
    assert (result.written, result.fixed_axes) == ("distilled", ("input_ids[1]=41", "attention_mask[1]=41")), result
    assert "input_ids[1]=41, attention_mask[1]=41 are fixed" in result.summary
    assert [i.shape for i in ort.InferenceSession(str(tmp_path / "a.onnx")).get_inputs()] == [["N", 41], ["N", 41]]


def test_teacher_outputs_computed_batch_by_batch_train_alike(gpt2, tmp_path, monkeypatch):
    """With no room to hold the teacher's outputs, each batch's are computed as it is trained on:
    the same training, up to onnxruntime's summation order (held-out error within 1e-3)."""
    from spa_compiler.torch import distill as module

    source, pruned, data = gpt2
    held = distill(pruned, source, data, tmp_path / "held.onnx", epochs=2, learning_rate=1e-3)
    monkeypatch.setattr(module, "TARGET_BYTES", 0)
    streamed = distill(pruned, source, data, tmp_path / "streamed.onnx", epochs=2, learning_rate=1e-3)
    assert streamed.after == pytest.approx(held.after, rel=1e-3)
    assert streamed.after < held.before


def test_cli_distils_and_reports(gpt2, tmp_path):
    source, pruned, data = gpt2
    result = run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", data, "-o", "out.onnx",
                     "--epochs", "12", "--lr", "1e-3", columns=200)
    assert result.returncode == 0, result.stderr
    assert "held-out relative error" in result.stdout and "(written)" in result.stdout
    assert (tmp_path / "out.onnx").exists()
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


REPORTS_TORCH = """
import sys
from spa_compiler.cli import main
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def test_cli_refuses_before_importing_torch(gpt2, tmp_path):
    """Input that does not fit is refused in one line before PyTorch is imported (seconds);
    input that fits goes on to import it."""
    source, pruned, data = gpt2
    np.savez(tmp_path / "short.npz", input=np.zeros((8, 16), np.int64))
    command = [sys.executable, "-c", REPORTS_TORCH, "distill", pruned, "--teacher", source]
    refused = subprocess.run([*map(str, command), "--data", str(tmp_path / "short.npz")], capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
    assert_one_line_error(refused, "--data", "shape")
    assert refused.stdout.strip() == "torch imported: False"
    accepted = subprocess.run([*map(str, command), "--data", str(data), "--epochs", "1", "-o", "out.onnx"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip().endswith("torch imported: True") and (tmp_path / "out.onnx").exists()


def test_cli_refuses_data_and_teacher_that_do_not_fit(gpt2, tmp_path, exported):
    source, pruned, data = gpt2
    before = snapshot(tmp_path, pruned)
    np.savez(tmp_path / "wrong.npz", ids=np.zeros((8, 32), np.int64))
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", tmp_path / "wrong.npz"),
                          "--data", "no array for input", "input")
    np.savez(tmp_path / "short.npz", input=np.zeros((8, 16), np.int64))
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", tmp_path / "short.npz"),
                          "--data", "shape", r"\(8, 16\)")
    np.savez(tmp_path / "fractions.npz", input=np.full((8, 32), 0.5))
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", tmp_path / "fractions.npz"),
                          "--data", "array 'input' holds 0.5", "int64 cannot hold")
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", exported("resnet_tiny_basic"),
                                  "--data", data), "--teacher", "pruned from")
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", data, "-o", pruned),
                          "is the input model")
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source), "--data is needed",
                          "BERT uncased WordPiece")
    assert_one_line_error(run_cli(tmp_path, "distill", pruned, "--teacher", source, "--data", data,
                                  "--input-shape", "input=1x32"), "--input-shape is for the shipped sentences")
    written = (tmp_path / f"{name}.npz" for name in ("wrong", "short", "fractions"))
    assert snapshot(tmp_path, pruned) == {**before, **snapshot(*written)}
