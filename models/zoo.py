"""Small reference CNNs and transformers, each built to exercise a channel-pruning coupling pattern.

Everything is defined from scratch (no torchvision, no fused attention modules).
Builders are seeded, return models in eval mode and perturb BatchNorm statistics and
BatchNorm/LayerNorm affine parameters so that a normalisation is never an identity.
Tiny variants take 32x32 inputs (8x8 for ``conv_fc``, 32 token ids for ``gpt2_tiny``)
so exporting and running them is fast.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .zoo_patterns import convnext_tiny, crnn_tiny, if_vad_tiny

__all__ = [
    "ARCHITECTURES",
    "Spec",
    "conv_bn_act",
    "conv_fc",
    "densenet_tiny",
    "gpt2_tiny",
    "mobilenet_v2",
    "mobilenet_v2_tiny",
    "mobilenet_v3_small",
    "mobilenet_v3_tiny",
    "resnet",
    "resnet_tiny_basic",
    "resnet_tiny_bottleneck",
    "resnext_tiny",
    "shufflenet_v2_tiny",
    "unet_tiny",
    "vit_tiny",
    "yolo_c2f_tiny",
]

Activation = Callable[[], nn.Module]


# --------------------------------------------------------------------------- #
# Shared building blocks
# --------------------------------------------------------------------------- #
def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: Activation | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _bn_act_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Pre-activation BatchNorm -> ReLU -> Conv (DenseNet ordering: BN is not foldable into the conv)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
    )


def _classifier(in_channels: int, num_classes: int) -> nn.Sequential:
    """GlobalAveragePool -> Flatten -> Linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


def _network(features: Sequence[nn.Module], head: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(features=nn.Sequential(*features), head=head))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _perturb_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        _perturb_norms(model)
    return model.eval()


class _Residual(nn.Module):
    """``act(body(x) + shortcut(x))``: the Add ties the body's last conv to the shortcut's channels.

    The shortcut is an identity (coupling reaches back to the block input) or, when
    shape changes, a strided 1x1 conv-bn projection (a second producer joined at the Add).
    """

    expansion = 1

    def __init__(
        self,
        body: nn.Module,
        in_channels: int,
        out_channels: int,
        stride: int,
        act: Activation | None = nn.ReLU,
    ) -> None:
        super().__init__()
        self.body = body
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            conv_bn_act(in_channels, out_channels, 1, stride, act=None) if needs_projection else nn.Identity()
        )
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


# --------------------------------------------------------------------------- #
# ResNet / ResNeXt
# --------------------------------------------------------------------------- #
class BasicBlock(_Residual):
    """Two 3x3 convs: the first conv's output channels are internal (freely prunable)."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        body = nn.Sequential(conv_bn_act(in_channels, planes, 3, stride), conv_bn_act(planes, planes, 3, act=None))
        super().__init__(body, in_channels, planes, stride)


class Bottleneck(_Residual):
    """1x1 reduce -> 3x3 (optionally grouped: ResNeXt) -> 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> None:
        mid = int(planes * base_width / 64) * groups
        out = planes * self.expansion
        body = nn.Sequential(
            conv_bn_act(in_channels, mid, 1),
            conv_bn_act(mid, mid, 3, stride, groups=groups),
            conv_bn_act(mid, out, 1, act=None),
        )
        super().__init__(body, in_channels, out, stride)


def _resnet(
    block: type[BasicBlock] | type[Bottleneck],
    layers: Sequence[int],
    width: int,
    num_classes: int,
    imagenet_stem: bool,
    **block_kwargs: int,
) -> nn.Sequential:
    """Stages double the width and halve the resolution after the first one."""
    stem: list[nn.Module] = (
        [conv_bn_act(3, width, 7, 2), nn.MaxPool2d(3, 2, 1)] if imagenet_stem else [conv_bn_act(3, width, 3)]
    )
    blocks: list[nn.Module] = []
    channels = width
    for stage, repeats in enumerate(layers):
        planes = width * 2**stage
        for index in range(repeats):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(block(channels, planes, stride, **block_kwargs))
            channels = planes * block.expansion
    return _network([*stem, *blocks], _classifier(channels, num_classes))


_RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def resnet(depth: int, width: int = 64, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """ImageNet ResNet (18/34: basic blocks, 50/101: bottlenecks); residual Adds chain whole stages together."""
    if depth not in _RESNET_LAYOUTS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(_RESNET_LAYOUTS)}")
    block, layers = _RESNET_LAYOUTS[depth]
    return _seeded(seed, lambda: _resnet(block, layers, width, num_classes, imagenet_stem=True))


def resnet_tiny_basic(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """CIFAR-style basic-block ResNet (3 stages, ~100k params): identity and projection shortcuts."""
    return _seeded(seed, lambda: _resnet(BasicBlock, (2, 2, 1), width, num_classes, imagenet_stem=False))


def resnet_tiny_bottleneck(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """Bottleneck ResNet, one block per stage: every stage starts with a downsample projection."""
    return _seeded(seed, lambda: _resnet(Bottleneck, (1, 1, 1), width, num_classes, imagenet_stem=False))


def resnext_tiny(num_classes: int = 10, width: int = 16, cardinality: int = 4, seed: int = 0) -> nn.Module:
    """ResNeXt bottlenecks with a grouped 3x3 conv: pruning must keep channels per group equal."""
    return _seeded(
        seed,
        lambda: _resnet(
            Bottleneck, (1, 1, 1), width, num_classes, imagenet_stem=False, groups=cardinality, base_width=32
        ),
    )


# --------------------------------------------------------------------------- #
# MobileNet V2 / V3
# --------------------------------------------------------------------------- #
class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``: fc2's outputs are coupled to x's channels via Mul."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeeze_channels, 1),
            nn.ReLU(),
            nn.Conv2d(squeeze_channels, channels, 1),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class _InvertedResidualSpec(NamedTuple):
    kernel_size: int
    hidden: int
    out: int
    stride: int
    act: Activation
    se: bool


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise kxk (channels tied 1:1 to the expansion) -> [SE] -> 1x1 linear project (+x)."""

    def __init__(self, in_channels: int, spec: _InvertedResidualSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if spec.hidden != in_channels:
            layers.append(conv_bn_act(in_channels, spec.hidden, 1, act=spec.act))
        layers.append(conv_bn_act(spec.hidden, spec.hidden, spec.kernel_size, spec.stride, spec.hidden, spec.act))
        if spec.se:
            layers.append(SqueezeExcitation(spec.hidden, _make_divisible(spec.hidden / 4)))
        layers.append(conv_bn_act(spec.hidden, spec.out, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.use_residual = spec.stride == 1 and in_channels == spec.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def _mobilenet(
    stem_channels: int,
    stem_stride: int,
    blocks: Sequence[_InvertedResidualSpec],
    last_channels: int,
    act: Activation,
    head: Callable[[int], nn.Module],
) -> nn.Sequential:
    features: list[nn.Module] = [conv_bn_act(3, stem_channels, 3, stem_stride, act=act)]
    channels = stem_channels
    for spec in blocks:
        features.append(InvertedResidual(channels, spec))
        channels = spec.out
    features.append(conv_bn_act(channels, last_channels, 1, act=act))
    return _network(features, head(last_channels))


def _mobilenet_v2(
    layout: Sequence[tuple[int, int, int, int]],
    width_mult: float,
    stem_channels: int,
    stem_stride: int,
    last_channels: int,
    num_classes: int,
) -> nn.Sequential:
    """``layout`` rows are torchvision's (expand ratio t, channels c, repeats n, first stride s)."""
    stem = _make_divisible(stem_channels * width_mult)
    blocks: list[_InvertedResidualSpec] = []
    channels = stem
    for t, c, n, s in layout:
        out = _make_divisible(c * width_mult)
        for index in range(n):
            blocks.append(_InvertedResidualSpec(3, channels * t, out, s if index == 0 else 1, nn.ReLU6, False))
            channels = out
    last = _make_divisible(last_channels * max(1.0, width_mult))
    return _mobilenet(stem, stem_stride, blocks, last, nn.ReLU6, lambda c: _classifier(c, num_classes))


_MOBILENET_V2_LAYOUT = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """Full MobileNetV2 (224x224): inverted residuals, depthwise convs, ReLU6 (exported as Clip)."""
    return _seeded(seed, lambda: _mobilenet_v2(_MOBILENET_V2_LAYOUT, width_mult, 32, 2, 1280, num_classes))


def mobilenet_v2_tiny(num_classes: int = 10, width_mult: float = 1.0, seed: int = 0) -> nn.Module:
    """Three-stage MobileNetV2 for 32x32 inputs, with and without residual inverted blocks."""
    layout = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2))
    return _seeded(seed, lambda: _mobilenet_v2(layout, width_mult, 16, 1, 64, num_classes))


_RE, _HS = nn.ReLU, nn.Hardswish


def _mobilenet_v3(
    layout: Sequence[tuple[int, int, int, bool, Activation, int]],
    width_mult: float,
    stem_channels: int,
    stem_stride: int,
    head_channels: int,
    num_classes: int,
) -> nn.Sequential:
    """``layout`` rows are (kernel, expanded, out, SE, activation, stride); the last conv is 6x the last block."""
    blocks = [
        _InvertedResidualSpec(k, _make_divisible(e * width_mult), _make_divisible(o * width_mult), s, act, se)
        for k, e, o, se, act, s in layout
    ]
    hidden = _make_divisible(head_channels * width_mult)

    def head(channels: int) -> nn.Module:
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.Hardswish(),
            nn.Linear(hidden, num_classes),
        )

    stem = _make_divisible(stem_channels * width_mult)
    return _mobilenet(stem, stem_stride, blocks, 6 * blocks[-1].out, _HS, head)


_MOBILENET_V3_SMALL_LAYOUT = (
    (3, 16, 16, True, _RE, 2),
    (3, 72, 24, False, _RE, 2),
    (3, 88, 24, False, _RE, 1),
    (5, 96, 40, True, _HS, 2),
    (5, 240, 40, True, _HS, 1),
    (5, 240, 40, True, _HS, 1),
    (5, 120, 48, True, _HS, 1),
    (5, 144, 48, True, _HS, 1),
    (5, 288, 96, True, _HS, 2),
    (5, 576, 96, True, _HS, 1),
    (5, 576, 96, True, _HS, 1),
)


def mobilenet_v3_small(width_mult: float = 1.0, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """Full MobileNetV3-Small (224x224): SE gates (Hardsigmoid -> Mul) and Hardswish."""
    return _seeded(seed, lambda: _mobilenet_v3(_MOBILENET_V3_SMALL_LAYOUT, width_mult, 16, 2, 1024, num_classes))


def mobilenet_v3_tiny(num_classes: int = 10, width_mult: float = 1.0, seed: int = 0) -> nn.Module:
    """Four MobileNetV3 blocks for 32x32 inputs: SE on the depthwise output, ReLU and Hardswish blocks."""
    layout = (
        (3, 16, 16, True, _RE, 2),
        (3, 48, 24, False, _RE, 2),
        (5, 72, 24, True, _HS, 1),
        (5, 96, 32, True, _HS, 2),
    )
    return _seeded(seed, lambda: _mobilenet_v3(layout, width_mult, 16, 1, 128, num_classes))


# --------------------------------------------------------------------------- #
# DenseNet
# --------------------------------------------------------------------------- #
class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3, output appended to the input with Concat.

    Every later consumer sees the input channels at fixed offsets of a growing concat,
    and the pre-activation BN sits after the Concat (it cannot be folded into a conv).
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _bn_act_conv(in_channels, bn_size * growth_rate, 1),
            _bn_act_conv(bn_size * growth_rate, growth_rate, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def _densenet(
    block_layers: Sequence[int], growth_rate: int, stem_channels: int, bn_size: int, num_classes: int
) -> nn.Sequential:
    features: list[nn.Module] = [nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)]
    channels = stem_channels
    for block, repeats in enumerate(block_layers):
        for _ in range(repeats):
            features.append(DenseLayer(channels, growth_rate, bn_size))
            channels += growth_rate
        if block < len(block_layers) - 1:  # transition: BN-ReLU-Conv1x1 (halve channels) -> AvgPool
            features += [_bn_act_conv(channels, channels // 2, 1), nn.AvgPool2d(2)]
            channels //= 2
    features += [nn.BatchNorm2d(channels), nn.ReLU()]
    return _network(features, _classifier(channels, num_classes))


def densenet_tiny(
    num_classes: int = 10, growth_rate: int = 32, block_layers: Sequence[int] = (3, 3), seed: int = 0
) -> nn.Module:
    """DenseNet-BC with two dense blocks joined by a transition layer."""
    return _seeded(seed, lambda: _densenet(block_layers, growth_rate, 2 * growth_rate, 2, num_classes))


# --------------------------------------------------------------------------- #
# ShuffleNetV2
# --------------------------------------------------------------------------- #
def _channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Reshape (N, g, C/g, H, W) -> Transpose -> Reshape: a fixed channel permutation."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (stride 1) or duplicate (stride 2) -> branch -> Concat -> shuffle.

    The pass-through half of a stride-1 unit couples its channels across the Split,
    Concat and the shuffle permutation into the next unit.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        branch = out_channels // 2
        self.stride = stride
        if stride == 1:
            self.branch1: nn.Module = nn.Identity()
            branch_in = in_channels // 2
        else:
            self.branch1 = nn.Sequential(
                conv_bn_act(in_channels, in_channels, 3, stride, in_channels, act=None),
                conv_bn_act(in_channels, branch, 1),
            )
            branch_in = in_channels
        self.branch2 = nn.Sequential(
            conv_bn_act(branch_in, branch, 1),
            conv_bn_act(branch, branch, 3, stride, branch, act=None),
            conv_bn_act(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1) if self.stride == 1 else (x, x)
        return _channel_shuffle(torch.cat([self.branch1(x1), self.branch2(x2)], 1))


def _shufflenet_v2(width: int, stage_repeats: Sequence[int], last_channels: int, num_classes: int) -> nn.Sequential:
    features: list[nn.Module] = [conv_bn_act(3, width, 3)]
    channels = width
    for stage, repeats in enumerate(stage_repeats):
        out = 2 * width * 2**stage
        for index in range(repeats):
            features.append(ShuffleUnit(channels, out, 2 if index == 0 else 1))
            channels = out
    features.append(conv_bn_act(channels, last_channels, 1))
    return _network(features, _classifier(last_channels, num_classes))


def shufflenet_v2_tiny(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """Two ShuffleNetV2 stages (chunk/concat/channel shuffle) for 32x32 inputs."""
    return _seeded(seed, lambda: _shufflenet_v2(width, (2, 2), 8 * width, num_classes))


# --------------------------------------------------------------------------- #
# Conv -> flatten -> FC
# --------------------------------------------------------------------------- #
def conv_fc(
    num_classes: int = 10, width: int = 16, image_size: int = 8, in_channels: int = 1, seed: int = 0
) -> nn.Module:
    """Conv-ReLU-MaxPool x2 -> Flatten -> Linear -> Linear.

    Each conv output channel owns a contiguous block of (H*W) input features of the first Linear.
    """
    spatial = (image_size // 4) ** 2

    def build() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * spatial, 4 * width),
            nn.ReLU(),
            nn.Linear(4 * width, num_classes),
        )

    return _seeded(seed, build)


# --------------------------------------------------------------------------- #
# U-Net
# --------------------------------------------------------------------------- #
def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(in_channels, out_channels), conv_bn_act(out_channels, out_channels))


class UNet(nn.Module):
    """Two-level U-Net; decoder inputs are Concat(upsampled, encoder skip).

    The deep stage upsamples with ConvTranspose2d (weights laid out [in, out, k, k]),
    the shallow stage with bilinear F.interpolate (Resize, channel-preserving).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.enc1 = _double_conv(in_channels, width)
        self.enc2 = _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _double_conv(4 * width, 2 * width)
        self.dec1 = _double_conv(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        bottom = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(bottom), e2], 1))
        up1 = F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.dec1(torch.cat([up1, e1], 1)))


def unet_tiny(num_classes: int = 10, in_channels: int = 3, width: int = 8, seed: int = 0) -> nn.Module:
    """Segmentation U-Net: output is (N, num_classes, H, W) for an (N, in_channels, H, W) input."""
    return _seeded(seed, lambda: UNet(in_channels, num_classes, width))


# --------------------------------------------------------------------------- #
# YOLOv8 C2f
# --------------------------------------------------------------------------- #
def _yolo_conv(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    return conv_bn_act(in_channels, out_channels, kernel_size, stride, act=nn.SiLU)


class C2f(nn.Module):
    """cv1 -> Split into halves -> chain of residual bottlenecks on the second half -> Concat all -> cv2.

    cv1's output channels are split in two groups; the second group is also the
    identity input of the residual bottleneck chain, and every piece reappears in
    the Concat feeding cv2.
    """

    def __init__(self, in_channels: int, out_channels: int, repeats: int = 1) -> None:
        super().__init__()
        self.hidden = out_channels // 2
        self.cv1 = _yolo_conv(in_channels, 2 * self.hidden)
        self.blocks = nn.ModuleList(
            _Residual(
                nn.Sequential(_yolo_conv(self.hidden, self.hidden, 3), _yolo_conv(self.hidden, self.hidden, 3)),
                self.hidden,
                self.hidden,
                1,
                act=None,
            )
            for _ in range(repeats)
        )
        self.cv2 = _yolo_conv((2 + repeats) * self.hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split(self.hidden, 1))
        for block in self.blocks:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))


def yolo_c2f_tiny(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """YOLOv8-style backbone (Conv-BN-SiLU, C2f with 1 and 2 bottlenecks) with a classification head."""

    def build() -> nn.Sequential:
        features = [
            _yolo_conv(3, width, 3),
            _yolo_conv(width, 2 * width, 3, 2),
            C2f(2 * width, 2 * width, 1),
            _yolo_conv(2 * width, 4 * width, 3, 2),
            C2f(4 * width, 4 * width, 2),
        ]
        return _network(features, _classifier(4 * width, num_classes))

    return _seeded(seed, build)


# --------------------------------------------------------------------------- #
# Transformers (ViT, GPT-2)
# --------------------------------------------------------------------------- #
class _MultiHeadAttention(nn.Module):
    """Explicit multi-head attention, exported as plain MatMul/Softmax/Reshape/Transpose ops.

    q, k and v are reshaped ``(b, l, heads * head_dim) -> (b, l, heads, head_dim)`` and transposed
    to ``(b, heads, l, head_dim)``; ``softmax(q @ k^T / sqrt(head_dim)) @ v`` is transposed back
    and reshaped to ``(b, l, heads * head_dim)`` before the output Linear (widths from the head
    count, as Hugging Face's ``all_head_size``, so a module with fewer heads runs).  Pruning must remove whole
    heads, or the same ``head_dim`` positions of q and k in every head, and v's channels
    together with the output Linear's input features.  Subclasses produce q, k, v and an
    optional boolean mask of the score positions to keep.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = hidden // heads
        self.proj = nn.Linear(hidden, hidden)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def keep_mask(self, length: int) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        q, k, v = (t.view(b, l, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        mask = self.keep_mask(l)
        if mask is not None:
            scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))


class SelfAttention(_MultiHeadAttention):
    """Separate q, k, v Linear projections (ViT/BERT style): three producers of the attention channels."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__(hidden, heads)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x), self.v(x)


class CausalSelfAttention(_MultiHeadAttention):
    """GPT-2 attention: one fused ``c_attn`` Linear (3 * hidden outputs) split into q, k, v, causal mask.

    The Split makes q, k and v three fixed slices of one weight's output channels; the
    lower-triangular bool buffer, sliced to the sequence length, is applied with Where.
    """

    def __init__(self, hidden: int, heads: int, max_len: int) -> None:
        super().__init__(hidden, heads)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.c_attn(x).split(self.heads * self.head_dim, dim=2)
        return q, k, v

    def keep_mask(self, length: int) -> torch.Tensor:
        return self.causal[:length, :length]


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` with a Linear -> GELU -> Linear MLP.

    Both residual Adds tie the attention output Linear, the MLP's second Linear and the
    LayerNorms (which normalise over the whole hidden axis) to one hidden-channel group;
    the MLP's inner channels are free.
    """

    def __init__(self, hidden: int, attention: _MultiHeadAttention, mlp_ratio: int, act: Activation) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = attention
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), act(), nn.Linear(mlp_ratio * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTransformer(nn.Module):
    """Patch-embedding Conv2d -> tokens (flatten(2).transpose(1, 2)) -> Concat class token -> + position embedding.

    The Conv's output channels become the hidden axis of the token sequence; the class
    token and position embedding are parameters joined by Concat and Add.  Even at static
    shapes the classic exporter writes ``flatten(2)`` as a Reshape to the run-time target
    ``Concat(Slice(Shape(conv), 0, 2), [-1])`` and the class token's ``expand`` as an Expand
    whose shape is computed with ConstantOfShape/Equal/Where.  The head reads the final
    LayerNorm's output at the class token (a Gather on the sequence axis).
    """

    def __init__(
        self, num_classes: int, image_size: int, patch: int, hidden: int, heads: int, depth: int, mlp_ratio: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, hidden))
        self.blocks = nn.Sequential(
            *(TransformerBlock(hidden, SelfAttention(hidden, heads), mlp_ratio, nn.GELU) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_tiny(
    num_classes: int = 10,
    image_size: int = 32,
    patch: int = 4,
    hidden: int = 64,
    heads: int = 4,
    depth: int = 2,
    mlp_ratio: int = 4,
    seed: int = 0,
    in_channels: int = 3,
) -> nn.Module:
    """Vision transformer for 32x32 images: 64 patch tokens + class token, separate q/k/v, exact GELU."""
    return _seeded(seed, lambda: VisionTransformer(num_classes, image_size, patch, hidden, heads, depth, mlp_ratio,
                                                   in_channels))


class GPT2(nn.Module):
    """Decoder-only language model: token + learned position embeddings (Gather), causal blocks, untied lm_head.

    Positions come from ``torch.arange`` of the input's sequence length (a Range op when
    that axis is dynamic), so the same graph serves any length up to ``max_len``.  The
    embeddings' columns are the hidden channels tied through every residual Add.
    """

    def __init__(self, vocab: int, max_len: int, hidden: int, heads: int, depth: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_len, hidden)
        gelu = functools.partial(nn.GELU, approximate="tanh")
        self.blocks = nn.Sequential(
            *(TransformerBlock(hidden, CausalSelfAttention(hidden, heads, max_len), 4, gelu) for _ in range(depth))
        )
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.lm_head(self.ln_f(self.blocks(self.wte(input_ids) + self.wpe(positions))))


def gpt2_tiny(
    vocab: int = 256, seq_len: int = 32, hidden: int = 64, heads: int = 4, depth: int = 2, seed: int = 0
) -> nn.Module:
    """GPT-2 with a fused c_attn Split, causal Where mask and tanh GELU; input int64 token ids (1, seq_len)."""
    return _seeded(seed, lambda: GPT2(vocab, seq_len, hidden, heads, depth))


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Spec:
    """A registered architecture: ``builder()`` returns the model for an input of ``input_shape``.

    ``input_dtype`` names a torch dtype; integer inputs are token ids.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    input_dtype: str = "float32"


_TINY = (1, 3, 32, 32)
_IMAGENET = (1, 3, 224, 224)

ARCHITECTURES: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("resnet_tiny_basic", resnet_tiny_basic, _TINY, "basic blocks: residual Add, identity/projection"),
        Spec("resnet_tiny_bottleneck", resnet_tiny_bottleneck, _TINY, "bottleneck ResNet: downsample projections"),
        Spec("resnext_tiny", resnext_tiny, _TINY, "ResNeXt: grouped 3x3 conv (cardinality 4)"),
        Spec("mobilenet_v2_tiny", mobilenet_v2_tiny, _TINY, "inverted residuals, depthwise conv, ReLU6/Clip"),
        Spec("mobilenet_v3_tiny", mobilenet_v3_tiny, _TINY, "squeeze-excitation Mul gate, Hardswish"),
        Spec("densenet_tiny", densenet_tiny, _TINY, "dense Concat growth, pre-activation BN, transitions"),
        Spec("shufflenet_v2_tiny", shufflenet_v2_tiny, _TINY, "chunk (Slice), Concat, reshape-transpose shuffle"),
        Spec("conv_fc", conv_fc, (1, 1, 8, 8), "conv channels feeding Flatten -> Linear"),
        Spec("unet_tiny", unet_tiny, _TINY, "skip Concat, ConvTranspose and Resize upsampling"),
        Spec("yolo_c2f_tiny", yolo_c2f_tiny, _TINY, "C2f: Split halves, bottleneck chain, Concat, SiLU"),
        Spec("vit_tiny", vit_tiny, _TINY, "ViT: patch Conv, class token Concat, q/k/v attention, LayerNorm"),
        Spec("gpt2_tiny", gpt2_tiny, (1, 32), "GPT-2: fused c_attn Split, causal mask, embeddings", "int64"),
        Spec("crnn_tiny", crnn_tiny, (1, 1, 32, 128), "CRNN: conv features -> BiLSTM -> GRU -> per-column logits"),
        Spec("convnext_tiny", convnext_tiny, _TINY, "ConvNeXt: depthwise 7x7, channels-last and written-out LayerNorms"),
        Spec("if_vad_tiny", if_vad_tiny, (1, 1, 512), "silero-VAD-like: an If around the whole network"),
        Spec("resnet50", functools.partial(resnet, 50), _IMAGENET, "full ResNet-50 (bottlenecks [3, 4, 6, 3])"),
        Spec("mobilenet_v2", mobilenet_v2, _IMAGENET, "full MobileNetV2 (width 1.0)"),
    )
}
