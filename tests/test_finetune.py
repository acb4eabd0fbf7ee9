"""Fine-tuning a pruned model in PyTorch (``models.finetune_benchmark``): the distillation loss
of hidden states, and a pruned transformer distilled toward its unpruned outputs, exported back
with a dynamic batch axis."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.export import export_onnx  # noqa: E402
from models.finetune_benchmark import Recipe, export_trained, hidden_state_loss, train  # noqa: E402
from models.zoo import ARCHITECTURES  # noqa: E402
from spa_compiler import PruneConfig, prune  # noqa: E402
from spa_compiler.torch import to_torch  # noqa: E402


def test_hidden_state_loss_counts_real_tokens_only():
    """Σ_t m_t ‖h_t − h*_t‖² / (d Σ_t m_t): padded positions do not count, real ones average."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.int64)
    outputs = teacher.copy()
    outputs[0, 2:] += 5.0  # padding: free
    outputs[1, 1] += 2.0  # one real token, every feature off by 2
    loss = hidden_state_loss(teacher, mask)(torch.from_numpy(outputs), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(4.0 * 3 / (3 * 5), rel=1e-6)
    assert hidden_state_loss(teacher, mask)(torch.from_numpy(outputs[:1]), torch.tensor([0])).item() == 0.0


def test_pruned_transformer_distils_toward_the_original(tmp_path):
    """gpt2_tiny (exported with a dynamic batch axis) pruned to half its FLOPs, distilled 4 epochs
    on 64 seeded token sequences toward the unpruned model's outputs: the loss on 32 other
    sequences falls by at least 20% (measured 0.0129 -> 0.0031), and the export with a dynamic
    batch axis reproduces the trained module on a batch of 5."""
    spec = ARCHITECTURES["gpt2_tiny"]
    source = export_onnx(spec.builder(), spec.input_shape, tmp_path / "gpt2.onnx", dynamic_batch=True,
                         input_dtype=spec.input_dtype)
    pruned = tmp_path / "pruned.onnx"
    prune(source, pruned, PruneConfig(flops=0.5, bench_runs=0))
    name = ort.InferenceSession(str(source)).get_inputs()[0].name
    rng = np.random.default_rng(1)
    train_ids, test_ids = (rng.integers(0, 64, (n, 32)).astype(np.int64) for n in (64, 32))

    def teacher(ids):
        return ort.InferenceSession(str(source)).run(None, {name: ids})[0]

    def held_out_loss(path):
        outputs = ort.InferenceSession(str(path)).run(None, {name: test_ids})[0]
        loss = hidden_state_loss(teacher(test_ids), np.ones(test_ids.shape, np.int64))
        return loss(torch.from_numpy(outputs), torch.arange(len(test_ids))).item()

    torch.manual_seed(0)
    module = train(to_torch(pruned), {name: train_ids}, hidden_state_loss(teacher(train_ids), np.ones((64, 32))),
                   Recipe(epochs=4, learning_rate=3e-3))
    tuned = export_trained(module, pruned, {name: train_ids[:2]}, tmp_path / "tuned.onnx")
    before, after = held_out_loss(pruned), held_out_loss(tuned)
    assert after <= 0.8 * before, (before, after)
    batch = test_ids[:5]
    with torch.no_grad():
        expected = module(torch.from_numpy(batch))
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).numpy()
    np.testing.assert_allclose(ort.InferenceSession(str(tuned)).run(None, {name: batch})[0], expected,
                               rtol=1e-4, atol=1e-4)
