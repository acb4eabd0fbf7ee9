"""Small decoder-only language models (Llama, Qwen2, Mistral, GPT-2) built from ``transformers``
configs with seeded random weights, exported to ONNX the common ways.

Llama, Qwen2 and Mistral have grouped-query attention (key/value heads repeated by Expand and
merged by Reshape), RMSNorm and rotary embeddings written out as plain ops and a SwiGLU
feed-forward block; GPT-2 has learned positions, LayerNorm, a GELU feed-forward block and one
packed ``c_attn`` projection (a Gemm) split into queries, keys and values. All tie their input
and output embeddings. ``export_decoder`` writes the logits-only form (``input_ids ->
logits``, classic or dynamo exporter) or, with ``cache=N``, the form with a key/value cache of N
past positions (``input_ids, attention_mask, past_key_values.{i}.key/value -> logits,
present.{i}.key/value``) at static shapes.
"""

from __future__ import annotations

import pathlib

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from .export import export_checked

__all__ = ["FAMILIES", "build_decoder", "export_decoder", "LogitsOnly", "WithCache"]

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # biases on the q/k/v projections
    "mistral": (MistralConfig, MistralForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),  # no grouped-query attention: kv_heads must equal heads
}


def build_decoder(family: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 128, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    """An eval-mode causal LM of ``family`` with seeded random weights."""
    config_class, model_class = FAMILIES[family]
    if family == "gpt2":
        if kv_heads != heads:
            raise ValueError(f"GPT-2 has no grouped-query attention: kv_heads ({kv_heads}) must equal heads ({heads})")
        config = config_class(vocab_size=vocab, n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                              n_positions=256, tie_word_embeddings=True, attn_implementation="eager",
                              bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = config_class(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
            tie_word_embeddings=True, attn_implementation="eager",
        )
    torch.manual_seed(seed)
    return model_class(config).eval()


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits`` (an all-ones attention mask is passed: without one, transformers
    looks for packed sequences with an op the classic exporter lacks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


class WithCache(torch.nn.Module):
    """``input_ids, attention_mask, past keys and values (flat, per layer) -> logits, present keys
    and values``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_decoder(model: torch.nn.Module, path: str | pathlib.Path, sequence: int = 16, dynamo: bool = False,
                   cache: int = 0, dynamic: bool = False) -> pathlib.Path:
    """Export ``model`` for a batch of one ``sequence`` tokens (with ``cache`` past positions when
    ``cache`` > 0), checked against torch; with ``dynamic`` (classic exporter, with a cache) the
    batch, the sequence and the past length are left free, as ``optimum`` exports."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, sequence), generator=generator)
    opset = 18 if dynamo else 17
    if not cache:
        return export_checked(LogitsOnly(model), {"input_ids": ids}, path, opset, ("logits",), dynamo=dynamo)
    head_dim = config.hidden_size // config.num_attention_heads
    inputs = {"input_ids": ids, "attention_mask": torch.ones(1, cache + sequence, dtype=torch.int64)}
    outputs = ["logits"]
    free = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "sequence"}}
    for layer in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{layer}.{kind}"] = torch.randn(
                1, config.num_key_value_heads, cache, head_dim, generator=generator)
            outputs.append(f"present.{layer}.{kind}")
            free[f"past_key_values.{layer}.{kind}"] = {0: "batch", 2: "past"}
            free[f"present.{layer}.{kind}"] = {0: "batch", 2: "total"}
    options = {"dynamic_axes": free} if dynamic else {}
    return export_checked(WithCache(model), inputs, path, opset, outputs, dynamo=dynamo, **options)
