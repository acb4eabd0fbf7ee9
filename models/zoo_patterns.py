"""Reference models for patterns beyond plain CNNs and transformers: recurrent layers (a CRNN text
recogniser), control flow (an ``If`` around the whole network, as silero VAD has) and ConvNeXt
blocks (channels-last LayerNorm between a depthwise conv and Linear layers, channels-first
LayerNorm written out as means, as ConvNeXt's reference code does in its downsampling layers).

Seeded like :mod:`models.zoo`; registered there in ``ARCHITECTURES``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["crnn_tiny", "convnext_tiny", "if_vad_tiny"]


def _seeded_eval(seed: int, model_type: type[nn.Module], *args: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_type(*args)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, ChannelsFirstLayerNorm)):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class CRNN(nn.Module):
    """Conv stack -> height pooled to 1 -> ``[width, batch, channels]`` -> bidirectional LSTM ->
    Linear per time step (CTC-style logits ``[width, batch, classes]``).

    The LSTM's input features are the last conv's channels (W's input axis); its hidden units
    couple every gate's rows of W, R and B in both directions, and the merge of the two
    directions ``[2, hidden] -> 2*hidden`` feeds a second (unidirectional GRU) layer and the
    classifier.
    """

    def __init__(self, classes: int, width: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, width), nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d((2, 1)),
            _conv_bn_relu(4 * width, 4 * width), nn.AdaptiveAvgPool2d((1, None)),
        )
        self.lstm = nn.LSTM(4 * width, hidden, bidirectional=True)
        self.gru = nn.GRU(2 * hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = self.features(x).squeeze(2).permute(2, 0, 1)
        return self.head(self.gru(self.lstm(sequence)[0])[0])


def crnn_tiny(classes: int = 37, width: int = 16, hidden: int = 48, seed: int = 0) -> nn.Module:
    """CRNN for 32x128 grey text lines: 4 conv layers, a BiLSTM, a GRU, logits per column."""
    return _seeded_eval(seed, CRNN, classes, width, hidden)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channels of ``[N, C, H, W]``, written out: exports as
    ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add over axis 1."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """``x + gamma * pw2(gelu(pw1(LN(dw7x7(x)))))`` with the LayerNorm and Linears channels-last."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem (4x4 conv, LayerNorm), two stages of ConvNeXt blocks joined by a
    channels-first LayerNorm and a 2x2 downsampling conv, global pooling, LayerNorm, Linear."""

    def __init__(self, classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), ChannelsFirstLayerNorm(width))
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(width) for _ in range(depth)))
        self.down = nn.Sequential(ChannelsFirstLayerNorm(width), nn.Conv2d(width, 2 * width, 2, stride=2))
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(2 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(2 * width, eps=1e-6)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_tiny(classes: int = 10, width: int = 32, depth: int = 2, seed: int = 0) -> nn.Module:
    """ConvNeXt for 32x32 images: stem, 2 + 2 blocks at 32 and 64 channels."""
    return _seeded_eval(seed, ConvNeXt, classes, width, depth)


class IfVAD(nn.Module):
    """silero-VAD-like: the whole network sits inside an ``If`` on the input (here: whether the
    signal is quiet, which scales it up first). Both branches read the same outer-scope weights:
    Conv1d front end -> Conv1d -> mean over time -> Linear -> sigmoid speech probability."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.front = nn.Conv1d(1, width, 8, stride=4)
        self.conv = nn.Conv1d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, 1)

    def network(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.front(x))))
        return torch.sigmoid(self.head(h.mean(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().max() < 0.5):
            return self.network(x * 4.0)
        return self.network(x)


def if_vad_tiny(width: int = 32, seed: int = 0) -> nn.Module:
    """The scripted (so the ``If`` survives export) silero-like model for ``[1, 1, 512]`` audio."""
    return torch.jit.script(_seeded_eval(seed, IfVAD, width))
