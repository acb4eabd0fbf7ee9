"""Quantized copies of the zoo models and of MiniLM, made with onnxruntime's own quantizer, and
the figures of pruning them (``python -m models.quantize``).

``static_qdq`` runs ``quantize_static`` (QDQ format, int8 weights per channel, uint8 activations)
calibrated on seeded standard-normal inputs; ``dynamic_int8`` runs ``quantize_dynamic`` (int8
weights, ``MatMulInteger``/``ConvInteger``). The figures prune each quantized model and its float
original alike and compare the two pruned models' outputs on seeded inputs (cosine), next to the
cosine of the two unpruned ones (what quantization alone costs).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from .sentences import mean_cosine

__all__ = ["static_qdq", "dynamic_int8", "integer_initializers", "run_outputs", "compare"]


class _SeededReader(CalibrationDataReader):
    """``count`` seeded standard-normal batches for one float input."""

    def __init__(self, name: str, shape: tuple[int, ...], count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._batches = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self._batches, None)


def static_qdq(source: str | os.PathLike, target: str | os.PathLike, per_channel: bool = True,
               samples: int = 8, seed: int = 0) -> pathlib.Path:
    """``source`` (one float input of fixed shape) quantized to QDQ int8 at ``target``."""
    model = onnx.load(str(source))
    value = model.graph.input[0]
    shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
    quantize_static(
        str(source), str(target), _SeededReader(value.name, shape, samples, seed),
        quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    return pathlib.Path(target)


def dynamic_int8(source: str | os.PathLike, target: str | os.PathLike, per_channel: bool = False) -> pathlib.Path:
    """``source`` with its MatMul/Conv weights quantized dynamically to int8 at ``target``."""
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    return pathlib.Path(target)


def integer_initializers(path: str | os.PathLike) -> int:
    """How many int8/uint8 initializers the model at ``path`` holds."""
    kinds = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(t.data_type in kinds for t in onnx.load(str(path)).graph.initializer)


def run_outputs(feeds: dict[str, np.ndarray]) -> Callable[[pathlib.Path], np.ndarray]:
    """A function running a model on ``feeds`` one sample at a time: its outputs, flattened
    together per sample (n, d)."""
    def run(path: pathlib.Path) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        count = len(next(iter(feeds.values())))
        rows = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
        return np.stack([np.concatenate([np.ravel(o) for o in row]) for row in rows]).astype(np.float64)

    return run


def compare(float_model: pathlib.Path, quantized: pathlib.Path, folder: pathlib.Path,
            outputs: Callable[[pathlib.Path], np.ndarray], **config) -> dict[str, float]:
    """Prune both models with the same ``PruneConfig`` options into ``folder``; the figures:
    FLOPs ratio, time and fidelity (cosine, synthetic inputs) of each run, the mean cosine of
    each pruned model's ``outputs`` (rows: samples) with its original's (``*_kept``), and between
    the two pruned models and the two unpruned ones."""
    from spa_compiler import PruneConfig, prune

    figures: dict[str, float] = {}
    results = {}
    for kind, source in (("float", float_model), ("quantized", quantized)):
        start = time.perf_counter()
        report = prune(source, folder / f"{kind}_pruned.onnx", PruneConfig(bench_runs=0, **config))
        figures[f"{kind}_seconds"] = time.perf_counter() - start
        figures[f"{kind}_flops_ratio"] = report.flops_ratio
        figures[f"{kind}_fidelity"] = report.fidelity.cosine
        results[kind] = outputs(folder / f"{kind}_pruned.onnx")
        results[f"{kind}_original"] = outputs(source)
    figures["cosine_unpruned"] = mean_cosine(results["float_original"], results["quantized_original"])
    figures["cosine_pruned"] = mean_cosine(results["float"], results["quantized"])
    for kind in ("float", "quantized"):
        figures[f"{kind}_kept"] = mean_cosine(results[f"{kind}_original"], results[kind])
    figures["int8_initializers"] = integer_initializers(folder / "quantized_pruned.onnx")
    return figures


_PIPELINES = {
    "fast": {"criterion": "l2", "allocation": "score", "refit_rounds": 0},
    "default": {},
}


def _zoo_case(arch: str, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, Callable, dict]:
    from .export import export_architecture

    source = export_architecture(arch, folder / f"{arch}.onnx")
    feeds = {"input": np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)}
    return source, static_qdq(source, folder / f"{arch}_qdq.onnx"), run_outputs(feeds), {}


def _minilm_case(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, Callable, dict]:
    from spa_compiler import load_model

    from .real import export_minilm, load_minilm
    from .sentences import ENCODER_INPUTS, SENTENCES, embed, tokenize

    shapes = {name: (1, 128) for name in ENCODER_INPUTS}
    source = folder / "minilm.onnx"
    onnx.save(load_model(export_minilm(folder / "exported.onnx"), shapes).model, str(source))
    inputs = tokenize(load_minilm()[0], SENTENCES, 128)
    return source, dynamic_int8(source, folder / "minilm_dynamic.onnx"), lambda path: embed(path, inputs), {
        "input_shapes": shapes}


def main(argv: list[str] | None = None) -> None:
    """Print the quantized-model figures: each model quantized, pruned to --flops 0.5 by the fast
    and the default pipeline (data-free), beside its float original pruned the same way."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pipelines", default="fast,default")
    parser.add_argument("--models", default="mobilenet_v2_tiny,resnet_tiny_basic,minilm")
    args = parser.parse_args(argv)
    print("| model | format | pipeline | FLOPs ratio | pruned q vs pruned float | unpruned q vs float"
          " | pruned q vs q | pruned float vs float | int8 initializers | seconds q / float |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        for name in args.models.split(","):
            source, quantized, outputs, extra = _minilm_case(folder) if name == "minilm" else _zoo_case(name, folder)
            for pipeline in args.pipelines.split(","):
                f = compare(source, quantized, folder, outputs, flops=0.5, **_PIPELINES[pipeline], **extra)
                kind = "dynamic int8" if name == "minilm" else "QDQ int8 per channel"
                print(f"| {name} | {kind} | {pipeline} | {f['quantized_flops_ratio']:.3f} | {f['cosine_pruned']:.4f}"
                      f" | {f['cosine_unpruned']:.4f} | {f['quantized_kept']:.4f} | {f['float_kept']:.4f}"
                      f" | {f['int8_initializers']} | {f['quantized_seconds']:.1f} / {f['float_seconds']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
