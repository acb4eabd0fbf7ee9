"""A small vision transformer trained on scikit-learn's 8x8 digits: a real, trained image
transformer to prune.

The 8x8 image is cut into 2x2 patches (a stride-2 convolution to ``width`` features: 16 tokens),
a learned class token is prepended and learned positions added; ``layers`` pre-LayerNorm blocks
follow, each multi-head self-attention (separate query, key, value and output projections,
``heads`` heads) and a GELU feed-forward block of ``4 * width`` neurons, both residual; the class
token's final LayerNorm feeds a linear classifier. It is written the way Hugging Face's ViT is
(reshape to heads, scaled dot product, softmax, reshape back), so its export has the
head structure spa-prune recognises.

Trained with ``models.digits.train_digits_model`` (``EPOCHS`` epochs, AdamW at ``LEARNING_RATE``
with ``WEIGHT_DECAY``; about a minute on one core): 0.967 top-1 on the 360 held-out images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .digits import train_digits_model

__all__ = ["DigitsViT", "train_digits_vit", "torch_pruning_vit", "EPOCHS", "LEARNING_RATE", "WEIGHT_DECAY"]

EPOCHS = 60
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.05


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attention(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5  # a constant, as in Hugging Face's ViT
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value, self.output = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        y = self.norm1(x)
        q, k, v = (project(y).reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                   for project in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        x = x + self.output((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """Vision transformer for ``[N, 1, 8, 8]`` images (see the module docstring)."""

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patches = nn.Conv2d(1, width, 2, stride=2)
            self.class_token = nn.Parameter(torch.zeros(1, 1, width))
            self.positions = nn.Parameter(torch.randn(1, 17, width) * 0.02)
            self.blocks = nn.ModuleList(_Block(width, heads, 4 * width) for _ in range(layers))
            self.norm = nn.LayerNorm(width)
            self.classifier = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(images.shape[0], -1, -1), tokens], dim=1) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x[:, 0]))


def train_digits_vit(seed: int = 0) -> tuple[nn.Module, float]:
    """``DigitsViT(seed=seed)`` trained on the digits training split; ``(model, test accuracy)``."""
    return train_digits_model(EPOCHS, seed, architecture=lambda s: DigitsViT(seed=s),
                              learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def torch_pruning_vit(model: DigitsViT, ratio: float, example: torch.Tensor) -> DigitsViT:
    """Torch-Pruning's head and FFN pruning of ``model`` (global L2 magnitude at ``ratio``, whole
    heads as in its ViT recipe), in place; the width of the residual stream and the classifier are kept."""
    import torch_pruning as tp

    heads = {project: block.heads for block in model.blocks for project in (block.query, block.key, block.value)}
    head_size = model.blocks[0].query.out_features // model.blocks[0].heads
    kept = [model.patches, model.classifier] + [layer for block in model.blocks for layer in (block.output, block.fc2)]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=kept,
    )
    pruner.step()
    for block in model.blocks:  # its channels, not pruner.num_heads: that reads 0 where it kept a block whole
        block.heads = block.query.out_features // head_size
    return model
