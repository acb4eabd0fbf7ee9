"""Benchmark: all-MiniLM-L6-v2 pruned to half its FLOPs, spa-prune next to Torch-Pruning.

    python -m models.transformer_benchmark [--runs 30] [--flops 0.5] [--json results.json]

Sequence length 128, batch 1, onnxruntime with one thread. For spa-prune (ONNX in, every
criterion) and for Torch-Pruning 1.6.1 (PyTorch in, its head and FFN pruning with L2 magnitude,
at the MACs spa-prune reached, then exported the same way), prints the MACs ratio, the time to
prune, the latency ratio and the fidelity: mean cosine similarity between the pruned and the
original sentence embeddings (mean pooling over the attention mask) on ``SENTENCES``. No
fine-tuning anywhere. Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx

from spa_compiler import CostModel, PruneConfig, analyze_graph, available_criteria, load_model, prune
from spa_compiler.bench import measure_latency

from .real import export_minilm, load_minilm
from .sentences import ENCODER_INPUTS, SENTENCES, embed, mean_cosine, tokenize
from .table import print_table, write_json

__all__ = ["main", "torch_pruning_minilm"]

SEQ_LEN = 128
SHAPES = {name: (1, SEQ_LEN) for name in ENCODER_INPUTS}


def _macs(path: Path) -> float:
    return CostModel(analyze_graph(load_model(path, SHAPES)), "flops").total


def torch_pruning_minilm(ratio: float, example: dict):
    """MiniLM with Torch-Pruning's head and FFN pruning (L2 magnitude, its BERT recipe); the
    hidden size is kept, as spa-prune keeps it."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    _, model = load_minilm()
    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {linear: a.num_attention_heads for a in attentions for linear in (a.query, a.key, a.value)}
    ignored = [model.embeddings] + [layer.attention.output.dense for layer in model.encoder.layer]
    ignored += [layer.output.dense for layer in model.encoder.layer]
    if getattr(model, "pooler", None) is not None:
        ignored.append(model.pooler)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=ignored, output_transform=lambda out: out.last_hidden_state.sum(),
    )
    pruner.step()
    for attention in attentions:
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features
    return model


def _measure(path: Path, inputs: dict, reference, feeds: dict, base_latency: float, runs: int) -> dict:
    return dict(
        cosine=mean_cosine(reference, embed(path, inputs)),
        latency_ratio=measure_latency(onnx.load(path), feeds, runs=runs) / base_latency,
    )


def _torch_pruning_row(folder: Path, target_macs: float, original_macs: float, inputs, reference, feeds,
                       base_latency: float, runs: int) -> dict:
    """Bisect Torch-Pruning's ratio until its MACs (counted on the export) match ``target_macs``."""
    import torch

    example = {name: torch.from_numpy(array[:1]) for name, array in inputs.items()}
    low, high, best = 0.0, 0.95, None
    for _ in range(7):
        ratio = (low + high) / 2
        start = time.perf_counter()
        model = torch_pruning_minilm(ratio, example)
        seconds = time.perf_counter() - start
        path = export_minilm(folder / "tp.onnx", SEQ_LEN, encoder=model)
        macs = _macs(path)
        if best is None or abs(macs - target_macs) < abs(best["macs"] - target_macs):
            best = dict(ratio=ratio, macs=macs, seconds=seconds, measured=_measure(path, inputs, reference, feeds, base_latency, runs))
        low, high = (ratio, high) if macs > target_macs else (low, ratio)
    return dict(tool="Torch-Pruning 1.6.1", criterion="l2", flops_ratio=best["macs"] / original_macs,
                prune_seconds=best["seconds"], **best["measured"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tokenizer, _ = load_minilm()
    inputs = tokenize(tokenizer, SENTENCES, SEQ_LEN)
    feeds = {name: array[:1] for name, array in inputs.items()}
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        source = export_minilm(folder / "minilm.onnx", SEQ_LEN)
        reference = embed(source, inputs)
        base_latency = measure_latency(onnx.load(source), feeds, runs=args.runs)
        original_macs = _macs(source)
        for criterion in available_criteria():
            output = folder / f"spa_{criterion}.onnx"
            start = time.perf_counter()
            report = prune(source, output, PruneConfig(flops=args.flops, criterion=criterion, input_shapes=SHAPES, bench_runs=0))
            seconds = time.perf_counter() - start
            heads = [g.channels_after for g in report.groups if g.kind == "heads"]
            rows.append(dict(tool="spa-prune", criterion=criterion, flops_ratio=report.flops_ratio, prune_seconds=seconds,
                             heads=heads, **_measure(output, inputs, reference, feeds, base_latency, args.runs)))
        l2_macs = next(r for r in rows if r["criterion"] == "l2")["flops_ratio"] * original_macs
        rows.append(_torch_pruning_row(folder, l2_macs, original_macs, inputs, reference, feeds, base_latency, args.runs))
    print(f"MiniLM-L6 at sequence {SEQ_LEN}, batch 1, 1 thread; original {base_latency:.2f} ms, "
          f"{original_macs / 1e9:.3f} GMACs; {len(SENTENCES)} sentences")
    print_table(rows, [
        ("tool", "tool", "20s"), ("criterion", "criterion", "9s"), ("flops_ratio", "FLOPs", "6.3f"),
        ("prune_seconds", "prune s", "8.2f"), ("latency_ratio", "latency", "8.3f"), ("cosine", "cosine", "7.4f"),
    ])
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
