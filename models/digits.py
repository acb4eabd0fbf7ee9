"""A small ResNet trained on scikit-learn's bundled 8x8 digits: a real, trained model to prune.

The reference models in ``zoo`` have random weights, so pruning them says nothing about
accuracy.  This module trains a tiny ResNet on ``sklearn.datasets.load_digits`` (bundled with
scikit-learn, nothing is downloaded), exports it to ONNX with a dynamic batch dimension, and
measures accuracy with onnxruntime, so a pruned file can be scored on the held-out split::

    x_train, x_test, y_train, y_test = load_digits_split()
    path, accuracy = export_digits_model("digits.onnx")          # ~0.98 on the 360 test images
    save_calibration("calib.npz", x_train)                        # for ``spa-prune --calib``
    onnx_accuracy("digits_pruned.onnx", x_test, y_test)

Training is deterministic (seeded initialisation, seeded shuffling, deterministic algorithms,
a fixed thread count) and takes about 8 s on one core of a 2-core CPU (15 epochs).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from .export import export_onnx
from .zoo import BasicBlock, conv_bn_act

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_THREADS",
    "INPUT_SHAPE",
    "digits_resnet",
    "export_digits_model",
    "load_digits_split",
    "onnx_accuracy",
    "save_calibration",
    "train_digits_model",
]

INPUT_SHAPE = (1, 1, 8, 8)
"""Shape of one exported sample: a single-channel 8x8 image (the batch axis is dynamic)."""

DEFAULT_EPOCHS = 15
DEFAULT_THREADS = 1
"""One intra-op thread: with two, a single competing process on a 2-core machine slows each of
the thousands of tiny ops down at OpenMP barriers (measured 0.37 s -> 13-55 s per epoch), while
one thread only ever loses its share (0.5 s -> ~1 s per epoch; 0.37 s with two threads when idle)."""
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(x_train, x_test, y_train, y_test)``: an 80/20 split with
    ``random_state=0`` (1437 / 360 images).

    Images are float32 ``[N, 1, 8, 8]``, scaled to [0, 1] (divided by 16) and then standardised
    with the training split's scalar mean and standard deviation; labels are int64.  ``seed`` is
    accepted for symmetry with the other functions but the split is always ``random_state=0``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    del seed  # the split is fixed: 80/20 with random_state=0
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=None
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return x_train, x_test, y_train, y_test


def digits_resnet(width: int = 32, seed: int = 0) -> nn.Module:
    """ResNet for 1x8x8 inputs: 3x3 stem (1 -> width) + BN + ReLU, a basic block at ``width``
    (identity shortcut), a strided basic block to ``2 * width`` (4x4, 1x1 projection shortcut),
    a basic block at ``2 * width`` (identity shortcut), global average pool, Linear to 10 classes.

    Returned in train mode with PyTorch's default initialisation under ``torch.manual_seed(seed)``
    (the global RNG is left untouched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            conv_bn_act(1, width, 3),
            BasicBlock(width, width, 1),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 10),
        )
    return model


@contextmanager
def _deterministic_cpu(threads: int) -> Iterator[None]:
    """``threads`` intra-op threads and deterministic algorithms for the duration, then restore."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError:  # pragma: no cover - not expected on CPU
        pass
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def train_digits_model(
    epochs: int = DEFAULT_EPOCHS, seed: int = 0, threads: int = DEFAULT_THREADS,
    architecture: Callable[[int], nn.Module] = lambda seed: digits_resnet(seed=seed),
    learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY,
) -> tuple[nn.Module, float]:
    """Train ``architecture(seed)`` (the digits ResNet by default) on the training split; return
    ``(model, test_accuracy)``.

    AdamW (lr 3e-3, weight decay 1e-4 by default) with a one-cycle schedule, batches of 32 in an
    order drawn from a generator seeded with ``seed``, random +-1 pixel shifts as augmentation
    (from the same generator), ``threads`` CPU threads and deterministic algorithms: the same
    ``seed`` (and ``threads``) gives the same weights.  The model is returned in eval mode; the
    accuracy is torch's on the test split.
    """
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    with _deterministic_cpu(threads):
        model = architecture(seed)
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
        background = float(inputs.min())  # a zero pixel after standardisation
        steps_per_epoch = -(-len(inputs) // BATCH_SIZE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, epochs=epochs, steps_per_epoch=steps_per_epoch
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                batch = _shift(inputs[index], generator, background)
                loss = F.cross_entropy(model(batch), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        accuracy = _accuracy(model, x_test, y_test)
    return model.eval(), accuracy


def _shift(batch: torch.Tensor, generator: torch.Generator, fill: float) -> torch.Tensor:
    """Translate the whole batch by a random (dy, dx) in {-1, 0, 1}^2, filling with background."""
    dy, dx = (int(v) - 1 for v in torch.randint(0, 3, (2,), generator=generator))
    if dy == 0 and dx == 0:
        return batch
    padded = F.pad(batch, (1, 1, 1, 1), value=fill)
    return padded[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]


def export_digits_model(
    path: str | os.PathLike[str], epochs: int = DEFAULT_EPOCHS, seed: int = 0, threads: int = DEFAULT_THREADS
) -> tuple[pathlib.Path, float]:
    """Train, export to ``path`` (input "input" ``[batch, 1, 8, 8]``, output "output"
    ``[batch, 10]``, batch dynamic, opset 17, BatchNorm folded by the exporter) and return
    ``(path, test accuracy measured with onnxruntime on the exported file)``."""
    model, _ = train_digits_model(epochs, seed, threads)
    path = export_onnx(model, INPUT_SHAPE, path, opset=17, dynamic_batch=True)
    _, x_test, _, y_test = load_digits_split(seed)
    return path, onnx_accuracy(path, x_test, y_test)


def save_calibration(path: str | os.PathLike[str], x: np.ndarray, samples: int = 256) -> pathlib.Path:
    """Write the first ``samples`` images of ``x`` to an ``.npz`` under the key "input"
    (float32 ``[n, 1, 8, 8]``): arrays keyed by graph input name, first axis = samples, the
    format ``spa-prune --calib`` reads."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=np.ascontiguousarray(x[:samples], dtype=np.float32))
    return path


def onnx_accuracy(model_path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX classifier at ``model_path`` on ``(x, y)``, with onnxruntime
    (CPU, one call for the whole array)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return float((logits.argmax(axis=1) == np.asarray(y)).mean())
