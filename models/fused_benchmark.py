"""Pruning models after onnxruntime's transformer optimiser (fused ``com.microsoft`` ops).

``python -m onnxruntime.transformers.optimizer --model_type bert`` is how BERT-style encoders are
usually deployed on onnxruntime: ``EmbedLayerNormalization``, ``Attention``,
``SkipLayerNormalization`` and ``BiasGelu`` replace the plain-op subgraphs. This benchmark prunes
all-MiniLM-L6-v2 (``models.minilm_task``: 300 test sentences at 32 tokens, mean cosine of the
pruned embeddings to the original ones) both as exported and after the optimiser, at
``--flops`` 0.75 and 0.5, and prints the FLOPs reached and the cosine of each::

    python -m models.fused_benchmark                  # the default pipeline, data-free
    python -m models.fused_benchmark --calib 128      # ... calibrated on 128 sentences
    python -m models.fused_benchmark --pipeline fast  # l2, allocation by scores, no re-fit

Also :func:`export_gpt2`, a GPT-2 built from a ``transformers`` config with random weights, for
the optimiser's ``gpt2`` fusions (``SkipLayerNormalization``, ``FastGelu``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

__all__ = ["optimize_for_onnxruntime", "export_gpt2", "main"]

FAST = {"criterion": "l2", "allocation": "score", "refit_rounds": 0}
TARGETS = (0.75, 0.5)


def optimize_for_onnxruntime(source: str | os.PathLike, output: str | os.PathLike, model_type: str,
                             num_heads: int, hidden_size: int) -> Path:
    """``onnxruntime.transformers.optimizer`` for CPU, its fusions for ``model_type`` (``opt_level``
    0: the fused ops of the Python optimiser, the same as at level 1 for BERT and GPT-2, without
    a round trip through an onnxruntime session), written to ``output``."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type=model_type, num_heads=num_heads,
                               hidden_size=hidden_size, opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(output))
    return Path(output)


def export_gpt2(path: str | os.PathLike, layers: int = 2, heads: int = 4, hidden: int = 64,
                vocab: int = 256, seq_len: int = 16, seed: int = 0) -> Path:
    """A ``transformers`` GPT-2 (``GPT2Config``, eager attention, no cache) with seeded random
    weights, every parameter drawn (std 0.02, norms around 1) so that no two layers share a
    constant, exported with the classic exporter: input ``input_ids`` [batch, sequence],
    output ``last_hidden_state``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=hidden, vocab_size=vocab,
                                     n_positions=4 * seq_len, use_cache=False)
    config._attn_implementation = "eager"
    model = transformers.GPT2Model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            parameter.copy_(base + 0.02 * torch.randn_like(parameter))

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              position_ids=positions, use_cache=False).last_hidden_state

    ids = torch.randint(0, vocab, (1, seq_len))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(LastHiddenState(), (ids,), str(path), input_names=["input_ids"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "last_hidden_state": axes})
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    from spa_compiler import PruneConfig, prune

    from .minilm_task import MiniLMTask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=("default", "fast"), default="default")
    parser.add_argument("--calib", type=int, default=0, help="calibration sentences (0: data-free)")
    args = parser.parse_args(argv)
    task = MiniLMTask()
    source, shapes = task.source()
    fused = optimize_for_onnxruntime(source, task.folder / "minilm_ort.onnx", "bert", 12, 384)
    options = dict(FAST) if args.pipeline == "fast" else {}
    if args.calib:
        options["calibration"] = str(task.calibration(task.folder / "calib.npz", args.calib))
    data = f"{args.calib} calibration sentences" if args.calib else "data-free"
    print(f"{task.description}; {args.pipeline} pipeline, {data}")
    print(f"{'model':<24}{'target':>8}{'FLOPs':>8}{'cosine':>9}{'seconds':>9}")
    for label, model in (("exported (plain ops)", source), ("onnxruntime-optimised", fused)):
        for target in TARGETS:
            output = task.folder / f"pruned_{model.stem}_{target}.onnx"
            start = time.perf_counter()
            report = prune(model, output, PruneConfig(flops=target, input_shapes=shapes, round_to=task.round_to,
                                                      bench_runs=0, **options))
            seconds = time.perf_counter() - start
            cosine = task.metrics(output)["mean cosine"]
            print(f"{label:<24}{target:>8.2f}{report.flops_ratio:>8.3f}{cosine:>9.3f}{seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
