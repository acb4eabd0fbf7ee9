"""Reference models for patterns PyTorch exports in ways spa-prune once refused (issue 7).

* ``groupnorm_tiny``: ``nn.GroupNorm``, which the TorchScript exporter writes at every opset as
  ``Reshape [0, G, -1] -> InstanceNormalization -> Reshape(Shape(x)) -> Mul -> Add``.
* ``chunk_tiny``: ``torch.chunk`` of a tensor whose channel count the exporter does not know (it
  follows a ``view(n, -1, h, w)`` with dynamic ``h, w``), so the halves are sliced at bounds
  computed at run time: ``Shape -> Gather -> Add -> Div -> Mul -> Slice``.
* ``shuffle_tiny``: two stride-1 ShuffleNetV2 units (chunk, branch, concat, channel shuffle)
  exported with dynamic ``h, w``: run-time chunk bounds and a shuffle target ``[n, 2, c // 2, h, w]``.

Each is exported with dynamic height and width (:func:`export_pattern`), which is what keeps the
shape arithmetic in the graph; pruning binds them with ``input_shapes``. With ``dynamo=True`` the
model goes through the dynamo exporter instead (static shapes): at opset 21 it writes
``nn.GroupNorm`` as the ``GroupNormalization`` operator.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .export import export_checked, export_onnx
from .zoo import ShuffleUnit, _classifier, _seeded, conv_bn_act

__all__ = ["PATTERNS", "Pattern", "groupnorm_tiny", "chunk_tiny", "shuffle_tiny", "export_pattern"]

_INPUT = (1, 3, 32, 32)
DYNAMIC_AXES = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}


def _conv_gn(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels), nn.SiLU())


class _GroupNormNet(nn.Module):
    """Conv-GroupNorm-SiLU stages with a residual block: the Add ties two GroupNorms' groups."""

    def __init__(self, width: int, groups: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_gn(3, width, groups)
        self.down = nn.Sequential(_conv_gn(width, 2 * width, groups), nn.MaxPool2d(2))
        self.body = nn.Sequential(_conv_gn(2 * width, 2 * width, groups), _conv_gn(2 * width, 2 * width, groups))
        self.head = _classifier(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        return self.head(x + self.body(x))


def _perturb_group_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def groupnorm_tiny(num_classes: int = 10, width: int = 32, groups: int = 8, seed: int = 0) -> nn.Module:
    """GroupNorm (8 groups of 4 to 8 channels) after every convolution, a residual block."""
    return _seeded(seed, lambda: _perturb_group_norms(_GroupNormNet(width, groups, num_classes)))


class _ChunkNet(nn.Module):
    """Conv -> view(n, -1, h, w) -> chunk(2): one half passes, the other goes through a conv,
    and both are concatenated again (a CSP/C2f-style split)."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 2 * width, 3)
        self.branch = conv_bn_act(width, width, 3)
        self.mix = conv_bn_act(2 * width, 2 * width, 3)
        self.head = _classifier(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y.view(y.shape[0], -1, y.shape[2], y.shape[3])  # the exporter loses the channel count
        kept, through = y.chunk(2, dim=1)
        return self.head(self.mix(torch.cat([kept, self.branch(through)], 1)))


def chunk_tiny(num_classes: int = 10, width: int = 32, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: _ChunkNet(width, num_classes))


def shuffle_tiny(num_classes: int = 10, width: int = 32, seed: int = 0) -> nn.Module:
    """A stem and two stride-1 ShuffleNetV2 units (``models.zoo.ShuffleUnit``), a 1x1 conv, a classifier."""

    def build() -> nn.Sequential:
        return nn.Sequential(
            conv_bn_act(3, 2 * width, 3),
            ShuffleUnit(2 * width, 2 * width, 1),
            ShuffleUnit(2 * width, 2 * width, 1),
            conv_bn_act(2 * width, 4 * width, 1),
            _classifier(4 * width, num_classes),
        )

    return _seeded(seed, build)


@dataclass(frozen=True)
class Pattern:
    name: str
    builder: Callable[[], nn.Module]
    description: str
    input_shape: tuple[int, ...] = _INPUT


PATTERNS: dict[str, Pattern] = {
    p.name: p
    for p in (
        Pattern("groupnorm_tiny", groupnorm_tiny, "GroupNorm as Reshape-InstanceNormalization-Reshape-Mul-Add"),
        Pattern("chunk_tiny", chunk_tiny, "chunk with run-time bounds (Shape-Gather-Add-Div-Mul-Slice)"),
        Pattern("shuffle_tiny", shuffle_tiny, "two stride-1 ShuffleNetV2 units, run-time chunk and shuffle shapes"),
    )
}


def export_pattern(name: str, path: str | os.PathLike[str], opset: int = 17, dynamo: bool = False) -> pathlib.Path:
    """Export the pattern model ``name`` with dynamic batch, height and width (or, with ``dynamo``,
    through the dynamo exporter at static shapes)."""
    pattern = PATTERNS[name]
    if not dynamo:
        return export_onnx(pattern.builder(), pattern.input_shape, path, opset, dynamic_axes=DYNAMIC_AXES)
    sample = torch.randn(pattern.input_shape, generator=torch.Generator().manual_seed(0))
    return export_checked(pattern.builder(), {"input": sample}, path, opset, dynamo=True)
