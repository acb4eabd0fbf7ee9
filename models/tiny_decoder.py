"""Tiny language models trained on text that ships with Python, to measure pruning on.

The corpus is the standard library's own top-level ``*.py`` files (sorted by name; every tenth
file is held out), read as bytes: the tokens are the 256 byte values. The ``llama`` model is a
``transformers`` ``LlamaForCausalLM`` (grouped-query attention, rotary embeddings, RMSNorm,
SwiGLU, tied embeddings; 4 layers, hidden 128, 4 query heads sharing 2 key/value heads, FFN
384); the ``gpt2`` model a ``GPT2LMHeadModel`` of the same depth and width (4 heads, learned
positions, LayerNorm, GELU FFN 512, one packed q/k/v projection, no dropout). Each is trained
for a few minutes on the CPU with AdamW, then exported to ONNX (``input_ids [1, 128] -> logits [1, 128,
256]``, classic exporter).

The trained weights and the export are cached in ``$SPA_PRUNE_CACHE`` (default
``~/.cache/spa-prune``) under ``tiny_decoder/``, keyed by the family and its recipe; nothing is
committed.
Perplexity is ``exp`` of the mean next-byte negative log-likelihood over fixed windows of the
held-out files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sysconfig
import time

import numpy as np
import torch

from .decoders import export_decoder

__all__ = ["RECIPES", "SEQUENCE", "corpus", "windows", "train_decoder", "tiny_decoder", "onnx_perplexity", "torch_perplexity",
           "cache_dir"]

SEQUENCE = 128  # tokens per window, for every family
_TRAINING = dict(vocab=256, sequence=SEQUENCE, batch=16, steps=360, lr=3e-3, seed=0)
RECIPES = {
    "llama": dict(layers=4, hidden=128, heads=4, kv_heads=2, intermediate=384, **_TRAINING),
    # learned positions take longer to train than rotary ones: 360 steps leave perplexity 8.2, 1,200 give 4.7
    "gpt2": dict(layers=4, hidden=128, heads=4, kv_heads=4, intermediate=512, **{**_TRAINING, "steps": 1200}),
}
EVAL_WINDOWS = 64
CALIBRATION_WINDOWS = 128


def cache_dir(family: str = "llama") -> pathlib.Path:
    root = pathlib.Path(os.environ.get("SPA_PRUNE_CACHE", pathlib.Path.home() / ".cache" / "spa-prune"))
    key = hashlib.sha256(json.dumps({"family": family, **RECIPES[family]}, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / "tiny_decoder" / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(training bytes, held-out bytes) of the standard library's top-level modules."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(f.read_bytes() for k, f in enumerate(files) if k % 10)
    held = b"".join(f.read_bytes() for k, f in enumerate(files) if not k % 10)
    return np.frombuffer(train, np.uint8).astype(np.int64), np.frombuffer(held, np.uint8).astype(np.int64)


def windows(tokens: np.ndarray, count: int, length: int, seed: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens at seeded random offsets, ``[count, length]``."""
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, count)
    return np.stack([tokens[s:s + length] for s in starts])


def _untrained(family: str) -> torch.nn.Module:
    from .decoders import build_decoder

    r = RECIPES[family]
    return build_decoder(family, r["layers"], r["hidden"], r["heads"], r["kv_heads"], r["intermediate"], r["vocab"],
                         seed=r["seed"])


def train_decoder(family: str = "llama", progress=print) -> torch.nn.Module:
    """Train the family's recipe on the training bytes (next-byte cross-entropy)."""
    r = RECIPES[family]
    torch.manual_seed(r["seed"])
    model = _untrained(family).train()
    train, _ = corpus()
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / r["steps"])))
    rng = np.random.default_rng(r["seed"])
    start = time.perf_counter()
    for step in range(r["steps"]):
        batch = torch.from_numpy(windows(train, r["batch"], r["sequence"] + 1, int(rng.integers(1 << 31))))
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, r["vocab"]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == r["steps"] - 1:
            progress(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def tiny_decoder(family: str = "llama", progress=print) -> tuple[torch.nn.Module, pathlib.Path]:
    """The family's trained model and its ONNX export, from the cache or trained now."""
    folder = cache_dir(family)
    weights, exported = folder / "weights.pt", folder / "tiny_decoder.onnx"
    if weights.exists():
        model = _untrained(family)
        model.load_state_dict(torch.load(weights))
    else:
        model = train_decoder(family, progress)
        torch.save(model.state_dict(), weights)
    if not exported.exists():
        export_decoder(model, exported, sequence=RECIPES[family]["sequence"])
    return model.eval(), exported


def _perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    logits = logits[:, :-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def onnx_perplexity(path: str | pathlib.Path, held_out: np.ndarray) -> float:
    """Perplexity of the ONNX model at ``path`` on ``[n, sequence]`` held-out windows, one at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: w[None]})[0] for w in held_out])
    return _perplexity(logits, held_out)


def torch_perplexity(model: torch.nn.Module, held_out: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(held_out), use_cache=False).logits.numpy()
    return _perplexity(logits, held_out)
