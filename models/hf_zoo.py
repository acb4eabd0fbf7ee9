"""Benchmark: Hugging Face architectures as their exporters write them, pruned data-free.

    python -m models.hf_zoo [--families bert,vit,...] [--flops 0.5] [--exporters classic,dynamo,dynamic]
                            [--json results.json]

Each family is built from a small ``transformers`` config with seeded random weights (offline;
untrained, so every bias is zero and every norm weight one, values the dynamo exporter merges),
exported by the classic (TorchScript, opset 17) and the dynamo exporter (``input_ids`` of 24
tokens, or ``pixel_values`` / audio of the size given), and pruned to ``--flops`` with the default
pipeline, data-free. ``dynamic`` is the classic exporter with the batch and the sequence (or
frames, or height and width) left free (``dynamic_axes``, as ``optimum`` exports), pruned with
them bound to the example's sizes; ``dynamo-dynamic`` the dynamo exporter with the batch (and a
token sequence) free.
A row: the achieved FLOPs ratio, the groups pruned, the attention groups rotated (head
dimensions) and the cosine of the outputs to the original's on synthetic inputs the statistics
did not see; or the error that stopped the export or the pruning. Random weights say nothing
about accuracy: this measures what the analysis finds in each export. Its
exactness column is the check (:func:`models.exactness.steered_error`) on the export with every
weight, bias and norm made random (``EXACTNESS``: half of every group's channels): the relative
error of the pruned model against the model with those channels' readers zeroed, rounding only
when every op rule maps its indices right (above ``RTOL``, 1e-4, it says FAILED).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers as hf

from spa_compiler import PruneConfig

from .table import print_table, write_json
from .zoo_rows import EXACTNESS, exactness, pruned_outcome

__all__ = ["EXACTNESS", "FAMILIES", "Family", "run"]

SEQUENCE = 24
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
GROUPED = dict(num_key_value_heads=2, **SMALL)  # grouped-query attention: two key/value heads


class Family:
    """A model builder and an example input: ``(name, tensor)``."""

    def __init__(self, build: Callable[[], torch.nn.Module], input_name: str, example: Callable[[], torch.Tensor]):
        self.build, self.input_name, self.example = build, input_name, example


def _text(config: type, model: type, **options: Any) -> Family:
    return Family(lambda: model(config(vocab_size=128, **options)), "input_ids",
                  lambda: torch.randint(5, 100, (1, SEQUENCE), generator=torch.Generator().manual_seed(0)))


def _image(config: type, model: type, size: int = 32, **options: Any) -> Family:
    return Family(lambda: model(config(**options)), "pixel_values",
                  lambda: torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))


def _audio(config: type, model: type, **options: Any) -> Family:
    """A wav2vec2-style encoder: 1,600 samples through two strided convolutions."""
    convolutions = dict(conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=4)
    return Family(lambda: model(config(**convolutions, **options)),
                  "input_values", lambda: torch.randn(1, 1600, generator=torch.Generator().manual_seed(0)))


FAMILIES: dict[str, Family] = {
    "bert": _text(hf.BertConfig, hf.BertModel, **SMALL),
    "roberta": _text(hf.RobertaConfig, hf.RobertaModel, **SMALL),
    "distilbert": _text(hf.DistilBertConfig, hf.DistilBertModel, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
    "albert": _text(hf.AlbertConfig, hf.AlbertModel, embedding_size=32, **SMALL),
    "electra": _text(hf.ElectraConfig, hf.ElectraModel, embedding_size=32, **SMALL),
    "deberta-v2": _text(hf.DebertaV2Config, hf.DebertaV2Model, **SMALL),
    "deberta-v3": _text(hf.DebertaV2Config, hf.DebertaV2Model, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        position_buckets=16, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                        position_biased_input=False, **SMALL),
    "mpnet": _text(hf.MPNetConfig, hf.MPNetModel, **SMALL),
    "xlm-roberta": _text(hf.XLMRobertaConfig, hf.XLMRobertaModel, **SMALL),
    "data2vec-text": _text(hf.Data2VecTextConfig, hf.Data2VecTextModel, **SMALL),
    "roformer": _text(hf.RoFormerConfig, hf.RoFormerModel, embedding_size=64, **SMALL),
    "convbert": _text(hf.ConvBertConfig, hf.ConvBertModel, embedding_size=64, **SMALL),
    "mobilebert": _text(hf.MobileBertConfig, hf.MobileBertModel, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, embedding_size=32, intra_bottleneck_size=32,
                        true_hidden_size=32, num_feedforward_networks=2),
    "squeezebert": _text(hf.SqueezeBertConfig, hf.SqueezeBertModel, embedding_size=64, **SMALL),
    "funnel": _text(hf.FunnelConfig, hf.FunnelModel, d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1],
                    num_decoder_layers=1),
    "t5-encoder": _text(hf.T5Config, hf.T5EncoderModel, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "bart": _text(hf.BartConfig, hf.BartModel, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128),
    "gpt2": _text(hf.GPT2Config, hf.GPT2LMHeadModel, n_embd=64, n_layer=2, n_head=4),
    "qwen2": _text(hf.Qwen2Config, hf.Qwen2ForCausalLM, **GROUPED),
    "llama": _text(hf.LlamaConfig, hf.LlamaForCausalLM, **GROUPED),
    "mistral": _text(hf.MistralConfig, hf.MistralForCausalLM, **GROUPED),
    "gemma": _text(hf.GemmaConfig, hf.GemmaForCausalLM, head_dim=16, **GROUPED),
    "phi": _text(hf.PhiConfig, hf.PhiForCausalLM, **SMALL),
    "bloom": _text(hf.BloomConfig, hf.BloomForCausalLM, hidden_size=64, n_layer=2, n_head=4),
    "falcon": _text(hf.FalconConfig, hf.FalconForCausalLM, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "qwen3": _text(hf.Qwen3Config, hf.Qwen3ForCausalLM, head_dim=16, **GROUPED),
    "gemma2": _text(hf.Gemma2Config, hf.Gemma2ForCausalLM, head_dim=16, **GROUPED),
    "gemma3": _text(hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, head_dim=16, **GROUPED),
    "phi3": _text(hf.Phi3Config, hf.Phi3ForCausalLM, pad_token_id=0, **GROUPED),
    "olmo2": _text(hf.Olmo2Config, hf.Olmo2ForCausalLM, **GROUPED),
    "granite": _text(hf.GraniteConfig, hf.GraniteForCausalLM, **GROUPED),
    "cohere": _text(hf.CohereConfig, hf.CohereForCausalLM, **GROUPED),
    "stablelm": _text(hf.StableLmConfig, hf.StableLmForCausalLM, **GROUPED),
    "starcoder2": _text(hf.Starcoder2Config, hf.Starcoder2ForCausalLM, **GROUPED),
    "glm": _text(hf.GlmConfig, hf.GlmForCausalLM, head_dim=16, pad_token_id=0, **GROUPED),
    "smollm3": _text(hf.SmolLM3Config, hf.SmolLM3ForCausalLM, pad_token_id=0, **GROUPED),
    "nemotron": _text(hf.NemotronConfig, hf.NemotronForCausalLM, head_dim=16, **GROUPED),
    "helium": _text(hf.HeliumConfig, hf.HeliumForCausalLM, head_dim=16, **GROUPED),
    "gpt-neox": _text(hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, **SMALL),
    "opt": _text(hf.OPTConfig, hf.OPTForCausalLM, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, word_embed_proj_dim=64),
    "gptj": _text(hf.GPTJConfig, hf.GPTJForCausalLM, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "codegen": _text(hf.CodeGenConfig, hf.CodeGenForCausalLM, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "biogpt": _text(hf.BioGptConfig, hf.BioGptForCausalLM, **SMALL),
    "xglm": _text(hf.XGLMConfig, hf.XGLMForCausalLM, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128),
    "persimmon": _text(hf.PersimmonConfig, hf.PersimmonForCausalLM, **SMALL),
    "mamba": _text(hf.MambaConfig, hf.MambaForCausalLM, hidden_size=64, num_hidden_layers=2, state_size=8),
    "rwkv": _text(hf.RwkvConfig, hf.RwkvForCausalLM, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                  intermediate_size=128),
    "modernbert": _text(hf.ModernBertConfig, hf.ModernBertModel, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=1, **SMALL),
    "xlnet": _text(hf.XLNetConfig, hf.XLNetModel, d_model=64, n_layer=2, n_head=4, d_inner=128),
    "big-bird": _text(hf.BigBirdConfig, hf.BigBirdModel, attention_type="original_full", **SMALL),
    "ibert": _text(hf.IBertConfig, hf.IBertModel, **SMALL),
    "fnet": _text(hf.FNetConfig, hf.FNetModel, hidden_size=64, num_hidden_layers=2, intermediate_size=128),
    "ernie": _text(hf.ErnieConfig, hf.ErnieModel, **SMALL),
    "rembert": _text(hf.RemBertConfig, hf.RemBertModel, input_embedding_size=32, output_embedding_size=32, **SMALL),
    "megatron-bert": _text(hf.MegatronBertConfig, hf.MegatronBertModel, **SMALL),
    "esm": _text(hf.EsmConfig, hf.EsmModel, pad_token_id=1, **SMALL),
    "mra": _text(hf.MraConfig, hf.MraModel, **SMALL),
    "luke": _text(hf.LukeConfig, hf.LukeModel, entity_emb_size=32, **SMALL),
    "vit": _image(hf.ViTConfig, hf.ViTModel, image_size=32, patch_size=8, **SMALL),
    "deit": _image(hf.DeiTConfig, hf.DeiTModel, image_size=32, patch_size=8, **SMALL),
    "dinov2": _image(hf.Dinov2Config, hf.Dinov2Model, image_size=32, patch_size=8, **SMALL),
    "clip-vision": _image(hf.CLIPVisionConfig, hf.CLIPVisionModel, image_size=32, patch_size=8, **SMALL),
    "siglip-vision": _image(hf.SiglipVisionConfig, hf.SiglipVisionModel, image_size=32, patch_size=8, **SMALL),
    "beit": _image(hf.BeitConfig, hf.BeitModel, image_size=32, patch_size=8, use_relative_position_bias=True, **SMALL),
    "levit": _image(hf.LevitConfig, hf.LevitModel, size=64, image_size=64, hidden_sizes=[32, 64, 96],
                    num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8]),
    "swin": _image(hf.SwinConfig, hf.SwinModel, image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                   num_heads=[2, 4], window_size=4),
    "swinv2": _image(hf.Swinv2Config, hf.Swinv2Model, image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                     num_heads=[2, 4], window_size=4),
    "pvt": _image(hf.PvtConfig, hf.PvtModel, size=64, image_size=64, num_encoder_blocks=2, depths=[1, 1],
                  sequence_reduction_ratios=[2, 1], hidden_sizes=[32, 64], num_attention_heads=[1, 2],
                  patch_sizes=[4, 2], strides=[4, 2], mlp_ratios=[2, 2]),
    "segformer": _image(hf.SegformerConfig, hf.SegformerModel, size=64, num_encoder_blocks=2, depths=[1, 1],
                        sr_ratios=[2, 1], hidden_sizes=[32, 64], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                        strides=[4, 2], mlp_ratios=[2, 2]),
    "resnet": _image(hf.ResNetConfig, hf.ResNetModel, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1]),
    "convnext": _image(hf.ConvNextConfig, hf.ConvNextModel, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2),
    "convnextv2": _image(hf.ConvNextV2Config, hf.ConvNextV2Model, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2),
    "regnet": _image(hf.RegNetConfig, hf.RegNetModel, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                     groups_width=8),
    "poolformer": _image(hf.PoolFormerConfig, hf.PoolFormerModel, hidden_sizes=[32, 64], depths=[1, 1],
                         num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
    "mobilenet-v2": _image(hf.MobileNetV2Config, hf.MobileNetV2Model, image_size=32, depth_multiplier=0.35),
    "mobilevit": _image(hf.MobileViTConfig, hf.MobileViTModel, size=64, image_size=64, hidden_sizes=[32, 48, 64],
                        neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64]),
    "focalnet": _image(hf.FocalNetConfig, hf.FocalNetModel, image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                       hidden_sizes=[32, 64]),
    "bit": _image(hf.BitConfig, hf.BitModel, num_groups=8, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1]),
    "mobilevitv2": _image(hf.MobileViTV2Config, hf.MobileViTV2Model, size=64, image_size=64, width_multiplier=0.25),
    "yolos": _image(hf.YolosConfig, hf.YolosModel, image_size=[32, 32], patch_size=8, num_detection_tokens=4, **SMALL),
    "data2vec-vision": _image(hf.Data2VecVisionConfig, hf.Data2VecVisionModel, image_size=32, patch_size=8, **SMALL),
    "hiera": _image(hf.HieraConfig, hf.HieraModel, size=64, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
                    embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]),
    "mobilenet-v1": _image(hf.MobileNetV1Config, hf.MobileNetV1Model, image_size=32, depth_multiplier=0.25),
    "swiftformer": _image(hf.SwiftFormerConfig, hf.SwiftFormerModel, size=64, depths=[1, 1, 1, 1],
                          embed_dims=[16, 32, 48, 64]),
    "dinov2-registers": _image(hf.Dinov2WithRegistersConfig, hf.Dinov2WithRegistersModel, image_size=32, patch_size=8,
                               **SMALL),
    "ijepa": _image(hf.IJepaConfig, hf.IJepaModel, image_size=32, patch_size=8, **SMALL),
    "vitdet": _image(hf.VitDetConfig, hf.VitDetModel, image_size=32, patch_size=8, pretrain_image_size=32, **SMALL),
    "dinov3": _image(hf.DINOv3ViTConfig, hf.DINOv3ViTModel, image_size=32, patch_size=8, **SMALL),
    "textnet": _image(hf.TextNetConfig, hf.TextNetModel),
    "whisper-encoder": Family(
        lambda: hf.WhisperModel(hf.WhisperConfig(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=50)).get_encoder(),
        "input_features", lambda: torch.randn(1, 16, 100, generator=torch.Generator().manual_seed(0))),
    "wav2vec2": _audio(hf.Wav2Vec2Config, hf.Wav2Vec2Model, **SMALL),
    "hubert": _audio(hf.HubertConfig, hf.HubertModel, **SMALL),
    "wavlm": _audio(hf.WavLMConfig, hf.WavLMModel, **SMALL),
    "sew": _audio(hf.SEWConfig, hf.SEWModel, squeeze_factor=2, **SMALL),
    "unispeech": _audio(hf.UniSpeechConfig, hf.UniSpeechModel, **SMALL),
}


class _FirstOutput(torch.nn.Module):
    """The model's logits, or its last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


EXPORTERS = ("classic", "dynamo", "dynamic", "dynamo-dynamic")


def export(family: Family, path: Path, dynamo: bool, dynamic: bool = False) -> Path:
    """``family``'s model (seed 0) exported to ``path`` by the dynamo or the classic exporter,
    with its batch and sequence axes free when ``dynamic`` (the dynamo exporter: the batch and a
    token sequence only, ``torch.export`` dimensions)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _FirstOutput(family.build()).eval()
    example = family.example()
    options = dict(input_names=[family.input_name], output_names=["output"], dynamo=dynamo)
    if dynamo:
        if dynamic:
            free = {0: torch.export.Dim("batch", max=64)}
            if family.input_name == "input_ids":
                free[1] = torch.export.Dim("sequence", min=2, max=512)
            options["dynamic_shapes"] = (free,)
        torch.onnx.export(model, (example,), **options).save(str(path))
        return path
    if dynamic:  # the batch and the sequence, or the frames, or the height and width
        free = range(1 if example.dim() == 2 else 2, example.dim())
        options["dynamic_axes"] = {family.input_name: {0: "batch", **{k: f"size_{k}" for k in free}},
                                   "output": {0: "batch"}}
    torch.onnx.export(model, (example,), str(path), opset_version=17, **options)
    return path


def input_shapes(family: Family) -> dict[str, tuple[int, ...]]:
    """The example's input shape, which binds a dynamic export's free axes."""
    return {family.input_name: tuple(family.example().shape)}


def run(names: list[str], flops: float, folder: Path,
        exporters: tuple[str, ...] = EXPORTERS[:2]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        for exporter in exporters:
            row: dict[str, Any] = {"family": name, "exporter": exporter}
            start = time.perf_counter()
            dynamic = exporter.endswith("dynamic")
            shapes = input_shapes(FAMILIES[name]) if dynamic else {}
            try:
                source = export(FAMILIES[name], folder / f"{name}_{exporter}.onnx",
                                dynamo=exporter.startswith("dynamo"), dynamic=dynamic)
            except Exception as error:  # the exporter's failure is a result
                row["outcome"], row["exactness"] = f"export fails: {type(error).__name__}", "-"
                rows.append(row)
                print(f"{name} {exporter}: {row['outcome']}", flush=True)
                continue
            config = PruneConfig(flops=flops, bench_runs=0, input_shapes=shapes)
            row["outcome"] = pruned_outcome(source, folder / f"{name}_{exporter}_pruned.onnx", config)
            row["exactness"] = exactness(source, shapes)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(f"{name} {exporter}: {row['outcome']}; exactness {row['exactness']} ({row['seconds']:.1f} s)",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: %(default)s")
    parser.add_argument("--flops", type=float, default=0.5, help="the target (default %(default)s)")
    parser.add_argument("--exporters", default="classic,dynamo", help=f"comma-separated, of: {', '.join(EXPORTERS)}")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    names, exporters = args.families.split(","), tuple(args.exporters.split(","))
    unknown = [n for n in names if n not in FAMILIES] + [e for e in exporters if e not in EXPORTERS]
    if unknown:
        parser.error(f"unknown families or exporters {', '.join(unknown)}; choose from {', '.join(FAMILIES)} "
                     f"and {', '.join(EXPORTERS)}")
    with tempfile.TemporaryDirectory(prefix="spa_hf_zoo_") as folder:
        rows = run(names, args.flops, Path(folder), exporters)
    print()
    print_table(rows, [("family", "family", "16s"), ("exporter", "exporter", "8s"), ("exactness", "exactness", "24s"),
                       ("outcome", "outcome", "s")])
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
