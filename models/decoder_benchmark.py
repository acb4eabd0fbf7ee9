"""Perplexity of a tiny decoder (``models.tiny_decoder``) pruned every way, with the peers.

    python -m models.decoder_benchmark [--family llama|gpt2] [--flops 0.9,0.75,0.5] [--no-peers] [--out DIR]

Rows, each at every ``--flops`` target, no fine-tuning anywhere (perplexity on 64 held-out
windows of 128 bytes; the achieved FLOPs ratio by spa-prune's cost model in brackets):

- spa-prune, width units (key/value groups with their query heads, FFN neurons; GPT-2's
  attention loses rotated head dimensions): L2 magnitude (``--criterion l2 --allocation score
  --refit 0``), the default pipeline data-free (with ``obs``; statistics from sequences the model
  wrote, as by default, and from token ids of the vocabulary's prior, as before), the default
  pipeline data-free with its own criterion (``obs_joint``), and the default pipeline calibrated
  on 128 training windows; for GPT-2 also the data-free and calibrated ones with whole heads
  (``--heads``);
- spa-prune, depth units (``--units depth``: whole attention or FFN sublayers, least measured
  distortion per FLOP first), calibrated; and one branch then width (``--depth 1``);
- onnxsim 0.8.1: ``apply_structured_pruning_cpp`` + ``apply_attention_head_pruning_cpp`` (L2) at
  the sparsity whose FLOPs come closest to the target, and ``apply_transformer_block_pruning``
  (ShortGPT-style block influence on the same calibration windows) dropping the fewest blocks
  that reach it;
- Torch-Pruning 1.6.1's LLM recipe (``BasePruner``, group L2 magnitude, heads and every width
  including the hidden size, ``lm_head`` ignored) on the PyTorch Llama, its ratio searched the
  same way (the recipe names Llama's q/k/v projections; GPT-2 packs them in one).

A peer gets 240 s per target; one that fails or runs out of time is reported as failing for
every target.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from spa_compiler import PruneConfig, prune

from .peers import flops_of, match_target, onnxsim_prune, onnxsim_simplify
from .tiny_decoder import (CALIBRATION_WINDOWS, EVAL_WINDOWS, RECIPES, SEQUENCE, corpus, onnx_perplexity, tiny_decoder,
                           windows)

__all__ = ["main"]

SHAPES = {"input_ids": (1, SEQUENCE)}
PEER_SECONDS = 240  # per target, the search included


def spa_methods(calibration: str, family: str) -> dict[str, Callable[[float], PruneConfig]]:
    fast = dict(criterion="l2", allocation="score", refit_rounds=0)
    methods = {
        "spa L2, width": lambda t: PruneConfig(flops=t, **fast),
        "spa obs data-free, prior tokens, width": lambda t: PruneConfig(flops=t, criterion="obs", self_written=False),
        "spa obs data-free, width": lambda t: PruneConfig(flops=t, criterion="obs"),
        "spa data-free (obs_joint), width": lambda t: PruneConfig(flops=t),
        "spa obs calibrated, width": lambda t: PruneConfig(flops=t, calibration=calibration),
    }
    if family == "gpt2":
        methods.update({
            "spa obs data-free, whole heads": lambda t: PruneConfig(flops=t, criterion="obs", head_dims=False),
            "spa obs calibrated, whole heads": lambda t: PruneConfig(flops=t, calibration=calibration, head_dims=False),
        })
    return {
        **methods,
        "spa calibrated, depth": lambda t: PruneConfig(flops=t, units="depth", calibration=calibration),
        "spa calibrated, depth 1 + width": lambda t: PruneConfig(flops=t, depth=1, calibration=calibration),
    }


def torch_pruning_llm(ratio: float, output: Path) -> Path:
    """Torch-Pruning's LLM recipe on a fresh copy of the trained model, exported to ``output``."""
    import torch
    import torch_pruning as tp

    from .decoders import export_decoder

    model, _ = tiny_decoder("llama")
    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    example = torch.zeros(1, SEQUENCE, dtype=torch.int64)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        output_transform=lambda out: out.logits.sum(), round_to=2,
    )
    pruner.step()
    config.hidden_size = model.model.embed_tokens.weight.shape[1]
    config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    for layer in model.model.layers:
        attention = layer.self_attn
        heads = attention.q_proj.out_features // attention.head_dim
        kv_heads = attention.k_proj.out_features // attention.head_dim
        attention.num_key_value_groups = heads // kv_heads
        config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    return export_decoder(model, output, sequence=SEQUENCE)


def _searched(prune_at: Callable[[float, Path], Path], target: float, original: float, folder: Path, tag: str,
              high: float) -> Path:
    paths: dict[float, Path] = {}

    def ratio(amount: float) -> float:
        paths[amount] = prune_at(amount, folder / f"{tag}_{amount:.4f}.onnx")
        return flops_of(paths[amount], SHAPES) / original

    amount, _ = match_target(ratio, target, high=high)
    return paths[amount]


def _block_pruned(source: Path, target: float, original: float, calibration: list[dict], folder: Path,
                  layers: int) -> Path:
    """onnxsim's transformer-block pruning dropping the fewest blocks that reach ``target``."""
    import onnxsim

    model = onnx.load(str(source))
    for count in range(1, 2 * layers + 1):
        pruned = onnxsim.apply_transformer_block_pruning(model, calibration_data=calibration, num_blocks_to_drop=count)
        path = folder / f"onnxsim_blocks_{count}.onnx"
        onnx.save(pruned, str(path))
        if flops_of(path, SHAPES) / original <= target + 0.02:
            return path
    return path


def _time_limited(seconds: int, run: Callable[[float], Path], target: float) -> Path:
    """``run(target)``, or a TimeoutError after ``seconds`` (a peer stuck in its own analysis)."""
    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return run(target)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(RECIPES), default="llama")
    parser.add_argument("--flops", default="0.9,0.75,0.5")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the pruned models here")
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.flops.split(",")]
    folder = args.out or Path(tempfile.mkdtemp(prefix="decoder_benchmark_"))
    folder.mkdir(parents=True, exist_ok=True)
    _, source = tiny_decoder(args.family)
    train, held = corpus()
    held_out = windows(held, EVAL_WINDOWS, SEQUENCE, seed=1)
    calibration = windows(train, CALIBRATION_WINDOWS, SEQUENCE, seed=2)
    calib_path = folder / "calibration.npz"
    np.savez(calib_path, input_ids=calibration)
    original = flops_of(source, SHAPES)
    print(f"unpruned: perplexity {onnx_perplexity(source, held_out):.3f} ({original / 1e6:.1f}M MACs)")

    rows: dict[str, dict[float, str]] = {}

    def record(name: str, target: float, path: Path, seconds: float) -> None:
        cell = f"{onnx_perplexity(path, held_out):.3f} ({flops_of(path, SHAPES) / original:.3f})"
        rows.setdefault(name, {})[target] = cell
        print(f"{name} @ {target}: {cell}  [{seconds:.1f} s]", flush=True)

    for name, make in spa_methods(str(calib_path), args.family).items():
        for target in targets:
            start = time.perf_counter()
            output = folder / f"{name.replace(' ', '_').replace(',', '')}_{target}.onnx"
            try:
                prune(source, output, dataclasses.replace(make(target), bench_runs=0))
            except Exception as exc:  # a row that fails is reported, the benchmark goes on
                rows.setdefault(name, {})[target] = f"fails: {exc}"
                print(f"{name} @ {target}: fails: {exc}")
                continue
            record(name, target, output, time.perf_counter() - start)

    if not args.no_peers:
        simplified = onnxsim_simplify(source, folder / "simplified.onnx")
        batches = [{"input_ids": calibration[k:k + 1]} for k in range(0, 32)]
        peers: dict[str, Callable[[float], Path]] = {
            "onnxsim L2 channels + heads": lambda t: _searched(
                lambda s, p: onnxsim_prune(simplified, s, p), t, original, folder, "onnxsim", 0.95),
            "onnxsim transformer blocks": lambda t: _block_pruned(simplified, t, original, batches, folder,
                                                                  RECIPES[args.family]["layers"]),
        }
        if args.family == "llama":
            peers["Torch-Pruning LLM recipe"] = lambda t: _searched(torch_pruning_llm, t, original, folder, "tp", 0.9)
        for name, run in peers.items():
            failure = None
            for target in targets:
                start = time.perf_counter()
                try:
                    if failure is None:
                        record(name, target, _time_limited(PEER_SECONDS, run, target), time.perf_counter() - start)
                        continue
                except Exception as exc:  # PeerError, a time-out, or the tool itself failing
                    failure = f"fails: {str(exc).splitlines()[0][:100]}"
                rows.setdefault(name, {})[target] = failure
                print(f"{name} @ {target}: {failure}")

    print("\n| method | " + " | ".join(f"--flops {t}" for t in targets) + " |")
    print("|---|" + "---|" * len(targets))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells.get(t, "-") for t in targets) + " |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
