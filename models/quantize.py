"""Quantized copies of the zoo models and of MiniLM, made with onnxruntime's own quantizer, and
the figures of pruning them (``python -m models.quantize``).

``static_qdq`` runs ``quantize_static`` (QDQ format, int8 weights per channel in 7 bits, uint8
activations) calibrated on given samples or seeded standard-normal inputs. The weights take 7
bits (``reduce_range``) so that the quantized models compute alike on every x86 machine: without
VNNI, onnxruntime's int8 convolutions add pairs of uint8 · int8 products in 16 bits, which
8-bit weights saturate (the tiny MobileNetV2's quantized outputs then agree with its float
ones at cosine 0.960 instead of 0.99996). ``dynamic_int8`` runs ``quantize_dynamic`` (int8
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


class _Reader(CalibrationDataReader):
    """The samples (axis 0) of one float input, one at a time."""

    def __init__(self, name: str, samples: np.ndarray) -> None:
        self._batches = iter([{name: sample[None].astype(np.float32)} for sample in samples])

    def get_next(self):
        return next(self._batches, None)


def static_qdq(source: str | os.PathLike, target: str | os.PathLike, per_channel: bool = True,
               calibration: np.ndarray | None = None, seed: int = 0) -> pathlib.Path:
    """``source`` (one float input) quantized to QDQ int8 at ``target``, calibrated on the
    ``calibration`` samples (axis 0), by default 8 seeded standard-normal ones."""
    value = onnx.load(str(source)).graph.input[0]
    if calibration is None:
        shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
        calibration = np.random.default_rng(seed).standard_normal((8, *shape[1:]))
    quantize_static(
        str(source), str(target), _Reader(value.name, calibration),
        quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=True,
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
            outputs: Callable[[pathlib.Path], np.ndarray],
            quantizer: Callable[[pathlib.Path, pathlib.Path], pathlib.Path] | None = None, **config) -> dict[str, float]:
    """Prune both models with the same ``PruneConfig`` options into ``folder``; the figures:
    FLOPs ratio, time and fidelity (cosine, synthetic inputs) of each run, the mean cosine of
    each pruned model's ``outputs`` (rows: samples) with its original's (``*_kept``), and between
    the two pruned models and the two unpruned ones. With the ``quantizer`` that made
    ``quantized``, also the pruned float model quantized by it, against ``quantized``
    (``quantized_after_kept``: pruning first, then quantizing)."""
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
    if quantizer is not None:
        after = quantizer(folder / "float_pruned.onnx", folder / "float_pruned_quantized.onnx")
        figures["quantized_after_kept"] = mean_cosine(results["quantized_original"], outputs(after))
    return figures


_PIPELINES = {
    "fast": {"criterion": "l2", "allocation": "score", "refit_rounds": 0},
    "default": {},
}


def _zoo_case(arch: str, folder: pathlib.Path, quantizer: Callable) -> tuple[pathlib.Path, pathlib.Path, Callable, dict]:
    from .export import export_architecture

    source = export_architecture(arch, folder / f"{arch}.onnx")
    feeds = {"input": np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)}
    return source, quantizer(source, folder / f"{arch}_quantized.onnx"), run_outputs(feeds), {"quantizer": quantizer}


def _minilm_case(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, Callable, dict]:
    from spa_compiler import load_model

    from .real import export_minilm, load_minilm
    from .sentences import ENCODER_INPUTS, SENTENCES, embed, tokenize

    shapes = {name: (1, 128) for name in ENCODER_INPUTS}
    source = folder / "minilm.onnx"
    onnx.save(load_model(export_minilm(folder / "exported.onnx"), shapes).model, str(source))
    inputs = tokenize(load_minilm()[0], SENTENCES, 128)
    return source, dynamic_int8(source, folder / "minilm_dynamic.onnx"), lambda path: embed(path, inputs), {
        "input_shapes": shapes, "quantizer": dynamic_int8}


def digits_accuracy(targets: tuple[float, ...] = (0.75, 0.5), calibration_samples: int = 512) -> None:
    """Print test accuracies of the trained digits ResNet, float and QDQ-quantized (calibrated on
    256 training images), unpruned and pruned by both pipelines (the default one calibrated on
    ``calibration_samples`` training images, ``--round-to 8``)."""
    from spa_compiler import PruneConfig, prune

    from .digits_task import DigitsTask

    task = DigitsTask()
    source, _ = task.source()
    quantized = static_qdq(source, task.folder / "digits_qdq.onnx", calibration=task.calibration_inputs(256)["input"])
    calibration = task.calibration(task.folder / "calibration.npz", calibration_samples)
    models = {"float": source, "QDQ int8": quantized}
    print("| digits ResNet | pipeline | unpruned | " + " | ".join(f"`--flops {t}`" for t in targets) + " |")
    print("|---|---|---|" + "---|" * len(targets))
    for pipeline, options in (("fast", _PIPELINES["fast"]), ("default, calibrated", {"calibration": str(calibration)})):
        for kind, path in models.items():
            cells = []
            for target in targets:
                out = task.folder / f"{kind}_{pipeline}_{target}.onnx".replace(" ", "_").replace(",", "")
                report = prune(path, out, PruneConfig(flops=target, round_to=8, bench_runs=0, **options))
                cells.append(f"{task.evaluate(out):.3f} ({report.flops_ratio:.3f})")
            print(f"| {kind} | {pipeline} | {task.evaluate(path):.3f} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Print the quantized-model figures: each model quantized, pruned to --flops 0.5 by the fast
    and the default pipeline (data-free), beside its float original pruned the same way."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pipelines", default="fast,default")
    parser.add_argument("--models", default="mobilenet_v2_tiny,resnet_tiny_basic,resnet_tiny_basic:dynamic,minilm",
                        help="zoo architectures (quantized static QDQ, or dynamically with ':dynamic') and minilm "
                             "(dynamically); default: %(default)s")
    parser.add_argument("--digits", action="store_true", help="print the trained digits ResNet's accuracies instead")
    args = parser.parse_args(argv)
    if args.digits:
        digits_accuracy()
        return
    print("| model | format | pipeline | FLOPs ratio | pruned q vs pruned float | unpruned q vs float"
          " | pruned q vs q | pruned float vs float | pruned float, then quantized, vs q | int8 initializers"
          " | seconds q / float |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        for name in args.models.split(","):
            arch, dynamic = name.removesuffix(":dynamic"), name == "minilm" or name.endswith(":dynamic")
            source, quantized, outputs, extra = _minilm_case(folder) if name == "minilm" else \
                _zoo_case(arch, folder, dynamic_int8 if dynamic else static_qdq)
            for pipeline in args.pipelines.split(","):
                f = compare(source, quantized, folder, outputs, flops=0.5, **_PIPELINES[pipeline], **extra)
                kind = "dynamic int8" if dynamic else "QDQ int8 per channel"
                print(f"| {arch} | {kind} | {pipeline} | {f['quantized_flops_ratio']:.3f} | {f['cosine_pruned']:.4f}"
                      f" | {f['cosine_unpruned']:.4f} | {f['quantized_kept']:.4f} | {f['float_kept']:.4f}"
                      f" | {f['quantized_after_kept']:.4f} | {f['int8_initializers']} | {f['quantized_seconds']:.1f} / {f['float_seconds']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
