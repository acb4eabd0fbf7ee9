"""A small vision transformer trained on scikit-learn's 8x8 digits: a real, trained image
transformer to prune.

The zoo's ``vit_tiny`` for one-channel 8x8 images: 2x2 patches (a stride-2 convolution to 64
features: 16 tokens) and a learned class token with learned positions, ``DEPTH`` pre-LayerNorm
blocks of multi-head self-attention (separate query, key, value and output projections, 4
heads, written as Hugging Face's ViT is) and a GELU feed-forward block of 256 neurons, then the
class token's LayerNorm and a linear classifier.

Trained with ``models.digits.train_digits_model`` (``EPOCHS`` epochs, AdamW at ``LEARNING_RATE``
with ``WEIGHT_DECAY``; about a minute on one core).
"""

from __future__ import annotations

import torch
from torch import nn

from .digits import train_digits_model
from .zoo import VisionTransformer, vit_tiny

__all__ = ["digits_vit", "train_digits_vit", "torch_pruning_vit", "DEPTH", "EPOCHS", "LEARNING_RATE", "WEIGHT_DECAY"]

DEPTH = 4
EPOCHS = 60
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.05


def digits_vit(seed: int = 0) -> VisionTransformer:
    """The ViT of the module docstring with seeded initial weights."""
    return vit_tiny(image_size=8, patch=2, depth=DEPTH, in_channels=1, seed=seed)


def train_digits_vit(seed: int = 0, epochs: int = EPOCHS) -> tuple[nn.Module, float]:
    """``digits_vit(seed)`` trained on the digits training split for ``epochs`` epochs;
    ``(model, test accuracy)``."""
    return train_digits_model(epochs, seed, architecture=digits_vit, learning_rate=LEARNING_RATE,
                              weight_decay=WEIGHT_DECAY)


def torch_pruning_vit(model: VisionTransformer, ratio: float, example: torch.Tensor) -> VisionTransformer:
    """Torch-Pruning's head and FFN pruning of ``model`` (global L2 magnitude at ``ratio``, whole
    heads as in its ViT recipe), in place; the width of the residual stream and the classifier
    are kept."""
    import torch_pruning as tp

    attentions = [block.attn for block in model.blocks]
    heads = {project: attention.heads for attention in attentions for project in (attention.q, attention.k, attention.v)}
    kept = [model.patch_embed, model.head] + [layer for block in model.blocks for layer in (block.attn.proj, block.mlp[2])]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=kept,
    )
    pruner.step()
    for attention in attentions:  # from its channels, not pruner.num_heads: that reads 0 where it kept a block whole
        attention.heads = attention.q.out_features // attention.head_dim
    return model
