"""Benchmark: a 1B-parameter Llama-style decoder (external data, > 2 GB) pruned to half its FLOPs.

    nice -n 10 python -m models.large_benchmark [--flops 0.5] [--criterion l2|obs] [--samples 16] [--cache DIR]

Builds a Llama-style model from a ``transformers`` ``LlamaConfig`` with seeded random weights
(hidden 2048, 16 layers, SwiGLU 8192, 32 query and 8 key/value heads, vocabulary 32000: 1.10B
parameters, 4.4 GB in float32), exports it once with ``torch.onnx.export(dynamo=True)`` and
external data into the cache folder (``~/.cache/spa-prune/llama-1b``; never part of the
repository), then prunes it with the quick pipeline (``--criterion l2 --allocation score --refit 0``)
in a fresh process that imports no torch; ``--criterion obs`` takes second-order scores and
compensation from ``--samples`` data-free samples instead (still ``--allocation score --refit 0``).
Prints the pruning time, the peak resident memory of that process and its ratio to the model's
size, each pass's seconds and peak, and the result's FLOPs, parameters and fidelity to the
original on synthetic inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LLAMA_1B", "export_llama", "main"]

LLAMA_1B = dict(hidden=2048, layers=16, intermediate=8192, vocab=32000, heads=32, kv_heads=8)
SEQUENCE = 16


def export_llama(path: Path, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                 seed: int = 0) -> Path:
    """Export a randomly initialised Llama-style causal LM (``input_ids`` of 1 x 16 tokens to
    ``logits``) with the dynamo exporter, its weights in ``<path>.data``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4 * SEQUENCE,
        use_cache=False, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids).logits

    ids = torch.randint(0, vocab, (1, SEQUENCE), generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Logits(model).eval(), (ids,), str(path), dynamo=True, external_data=True,
                          input_names=["input_ids"], output_names=["logits"])
    return path


_WORKER = r"""
import json, re, sys, time
from spa_compiler import PruneConfig, prune
source, output, flops, criterion, samples = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
start = time.perf_counter()
config = PruneConfig(flops=flops, bench_runs=0, criterion=criterion, allocation="score", refit_rounds=0,
                     calibration_samples=samples)
report = prune(source, output, config)
elapsed = time.perf_counter() - start
peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
fidelity = report.fidelity
print(json.dumps(dict(prune_seconds=elapsed, peak_mb=peak_mb, flops_ratio=report.flops_ratio,
                      params_ratio=report.params_ratio, cosine=fidelity.cosine if fidelity else None,
                      timings=report.timings, stage_peak_mb=report.peak_mb)))
"""


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--criterion", choices=("l2", "obs"), default="l2",
                        help="obs: second-order scores and compensation from data-free statistics")
    parser.add_argument("--samples", type=int, default=16, help="synthetic calibration samples (obs)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spa-prune" / "llama-1b")
    args = parser.parse_args(argv)
    source = args.cache / "llama-1b.onnx"
    if not (source.exists() and Path(f"{source}.data").exists()):
        print(f"exporting the model to {source} (once)", flush=True)
        export_llama(source, **LLAMA_1B)
    with tempfile.TemporaryDirectory(dir=args.cache) as folder:
        output = Path(folder) / "pruned.onnx"
        worker = [sys.executable, "-c", _WORKER, str(source), str(output), str(args.flops), args.criterion,
                  str(args.samples)]
        completed = subprocess.run(worker,
                                   capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if completed.returncode:
            sys.exit(f"pruning failed: {completed.stderr.strip().splitlines()[-1]}")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        result["model_mb"], result["pruned_mb"] = _size_mb(source), _size_mb(output)
    result["peak_ratio"] = result['peak_mb'] / result["model_mb"]
    print(f"model {result['model_mb']:.0f} MiB -> {result['pruned_mb']:.0f} MiB at --flops {args.flops}: "
          f"FLOPs ratio {result['flops_ratio']:.3f}, parameters {result['params_ratio']:.3f}, "
          f"cosine to the original {result['cosine']:.4f}")
    print(f"pruning {result['prune_seconds']:.1f} s, peak resident memory {result['peak_mb']:.0f} MiB "
          f"= {result['peak_ratio']:.2f}x the model's size")
    print("per pass: " + ", ".join(f"{name} {seconds:.1f} s ({result['stage_peak_mb'][name]:.0f} MiB)"
                                   for name, seconds in result["timings"].items()))
    return result


if __name__ == "__main__":
    main()
