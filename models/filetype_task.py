"""Accuracy task: magika's file-type classifier on the files of this machine's Python installation.

magika (``pip install --no-deps magika==1.0.3``) ships a trained byte-level model: the first and
last kilobyte of a file, each byte a one-hot row, through a dense layer, a convolution, a max over
positions and a classifier over 214 content types. The test and calibration files are this
Python's own: the standard library and the packages spa-prune itself depends on (``PACKAGES``,
so that other packages installed beside them change nothing), listed in sorted order, each
labelled by its extension (``LABELS``: ``.py`` is python, ``.so`` elf, ``.pyc`` pythonbytecode, ...). Per
label a seeded draw puts up to ``PER_LABEL`` files (at most half of them) in the test set and up to
``CALIBRATION_PER_LABEL`` of the rest in the calibration pool, so the two never overlap and
every label with two files or more is in both. The files differ with those packages' releases;
the description gives the counts. The features are magika's (its ``config.min.json``):
the first ``beg_size`` bytes of the first ``block_size`` after leading whitespace, the last
``end_size`` of the last ``block_size`` before trailing whitespace, padded with its padding
token. The metric is top-1 accuracy against the extension's label.
"""

from __future__ import annotations

import json
import os
import sysconfig
from functools import cached_property
from pathlib import Path

import numpy as np

from .shipped import package_dir
from .tasks import Shapes, Task, run_batched

__all__ = ["FileTypeTask", "LABELS", "magika_features", "python_files"]

LABELS = {
    ".py": "python", ".pyi": "python", ".pyc": "pythonbytecode", ".so": "elf", ".h": "c", ".c": "c", ".cpp": "cpp",
    ".hpp": "cpp", ".json": "json", ".md": "markdown", ".rst": "rst", ".txt": "txt", ".html": "html", ".css": "css",
    ".js": "javascript", ".xml": "xml", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini",
    ".sh": "shell", ".csv": "csv", ".png": "png", ".jpg": "jpeg", ".gif": "gif", ".ico": "ico", ".svg": "svg",
    ".pdf": "pdf", ".gz": "gzip", ".zip": "zip", ".whl": "zip", ".ttf": "ttf", ".otf": "otf", ".onnx": "onnx",
    ".npy": "npy", ".proto": "proto", ".tex": "latex",
}
"""Extensions whose files have one content type, and its magika label."""

PACKAGES = ("numpy", "onnx", "onnxruntime", "onnx_graphsurgeon", "networkx", "typer", "rich", "google", "PIL", "magika")
"""Packages whose files join the standard library's: spa-prune's dependencies and magika."""

PER_LABEL = 20  # test files per label at most
CALIBRATION_PER_LABEL = 8  # calibration files per label at most
SMALLEST = 64  # bytes: smaller files magika does not give its model
SEED = 0
_INSTALL_HINT = "pip install --no-deps magika==1.0.3"


def python_files() -> dict[str, list[Path]]:
    """The labelled files of the standard library and of ``PACKAGES``, per label, in sorted order."""
    packages = [package_dir(name) for name in PACKAGES]
    roots = [Path(sysconfig.get_paths()["stdlib"]), *sorted(folder for folder in packages if folder)]
    found: dict[str, list[Path]] = {}
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders.sort()
            for name in sorted(names):
                path = Path(folder) / name
                label = LABELS.get(path.suffix)
                if label and path.is_file() and not path.is_symlink() and path.stat().st_size >= SMALLEST:
                    found.setdefault(label, []).append(path)
    return found


def magika_features(path: Path, config: dict) -> np.ndarray:
    """magika's model input for the file at ``path`` (see the module docstring): int32 ``[beg_size + end_size]``."""
    data = path.read_bytes()
    block = config["block_size"]
    head, tail = data[:block].lstrip(), data[-block:].rstrip()
    beg, end = list(head[: config["beg_size"]]), list(tail[-config["end_size"]:])
    pad = config["padding_token"]
    return np.asarray(beg + [pad] * (config["beg_size"] - len(beg)) + [pad] * (config["end_size"] - len(end)) + end,
                      dtype=np.int32)


class FileTypeTask(Task):
    name = "filetype"
    metric_names = ("accuracy",)
    default_test_samples = PER_LABEL
    round_to = 8

    @property
    def description(self) -> str:
        files, labels = self.test_files
        return (f"magika file-type classifier, top-1 accuracy on {len(files)} files of the standard library and "
                f"spa-prune's dependencies ({len(set(labels))} types, at most {self.test_samples} each)")

    @cached_property
    def model_dir(self) -> Path:
        package = package_dir("magika")
        folder = package / "models" / "standard_v3_3" if package else None
        if folder is None or not (folder / "model.onnx").is_file():
            raise FileNotFoundError(f"magika's model is not installed: {_INSTALL_HINT}")
        return folder

    @cached_property
    def config(self) -> dict:
        return json.loads((self.model_dir / "config.min.json").read_text())

    def source(self) -> tuple[Path, Shapes]:
        return self.model_dir / "model.onnx", {"bytes": (1, self.config["beg_size"] + self.config["end_size"])}

    @cached_property
    def split(self) -> tuple[list[tuple[Path, str]], list[Path]]:
        """(test files with their labels, the calibration pool): per label a seeded draw, up to
        ``test_samples`` (at most half) for the test, up to ``CALIBRATION_PER_LABEL`` of the rest for calibration."""
        rng = np.random.default_rng(SEED)
        test, pool = [], []
        for label, paths in sorted(python_files().items()):
            order = rng.permutation(len(paths))
            count = min(self.test_samples, max(1, len(paths) // 2))
            test += [(paths[k], label) for k in order[:count]]
            pool += [paths[k] for k in order[count:count + CALIBRATION_PER_LABEL]]
        return test, [pool[k] for k in rng.permutation(len(pool))]

    @cached_property
    def test_files(self) -> tuple[list[Path], list[str]]:
        test, _ = self.split
        return [path for path, _ in test], [label for _, label in test]

    @cached_property
    def test_inputs(self) -> np.ndarray:
        return np.stack([magika_features(path, self.config) for path in self.test_files[0]])

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        _, pool = self.split
        return {"bytes": np.stack([magika_features(path, self.config) for path in pool[:samples]])}

    def metrics(self, path: str | Path) -> dict[str, float]:
        scores = run_batched(path, {"bytes": self.test_inputs}, batch=64)
        names = np.asarray(self.config["target_labels_space"])
        return {"accuracy": float(np.mean(names[scores.argmax(axis=1)] == np.asarray(self.test_files[1])))}
