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

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

__all__ = ["static_qdq", "dynamic_int8", "integer_initializers", "mean_cosine", "compare"]


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


def mean_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over samples (first axis) of the cosine between the flattened outputs."""
    x = np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1) for v in a], axis=1)
    y = np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1) for v in b], axis=1)
    cos = (x * y).sum(axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return float(cos.mean())


def _run(path: pathlib.Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    count = len(next(iter(feeds.values())))
    runs = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [np.concatenate(parts) for parts in zip(*runs)]


def compare(float_model: pathlib.Path, quantized: pathlib.Path, folder: pathlib.Path,
            feeds: dict[str, np.ndarray], **config) -> dict[str, float]:
    """Prune both models with the same ``PruneConfig`` options; the figures of the comparison."""
    from spa_compiler import PruneConfig, prune

    figures = {}
    outputs = {}
    for kind, source in (("float", float_model), ("quantized", quantized)):
        start = time.perf_counter()
        report = prune(source, folder / f"{kind}_pruned.onnx", PruneConfig(bench_runs=0, **config))
        figures[f"{kind}_seconds"] = time.perf_counter() - start
        figures[f"{kind}_flops_ratio"] = report.flops_ratio
        figures[f"{kind}_fidelity"] = report.fidelity.cosine
        outputs[kind] = _run(folder / f"{kind}_pruned.onnx", feeds)
        outputs[f"{kind}_original"] = _run(source, feeds)
    figures["cosine_unpruned"] = mean_cosine(outputs["float_original"], outputs["quantized_original"])
    figures["cosine_pruned"] = mean_cosine(outputs["float"], outputs["quantized"])
    figures["int8_initializers"] = integer_initializers(folder / "quantized_pruned.onnx")
    figures["size_kb"] = (folder / "quantized_pruned.onnx").stat().st_size / 1024
    return figures
