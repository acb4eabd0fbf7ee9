"""Write the example model ``models/examples/mini_resnet.onnx``: ``python -m models.make_example [PATH]``."""

from __future__ import annotations

import argparse
import os
import pathlib

from .export import export_architecture

__all__ = ["DEFAULT_EXAMPLE_PATH", "make_example"]

DEFAULT_EXAMPLE_PATH = pathlib.Path(__file__).resolve().parent / "examples" / "mini_resnet.onnx"


def make_example(path: str | os.PathLike[str] = DEFAULT_EXAMPLE_PATH) -> pathlib.Path:
    """Export the seeded ``resnet_tiny_basic`` (~100k params, input 1x3x32x32, opset 17) to ``path``."""
    return export_architecture("resnet_tiny_basic", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", default=DEFAULT_EXAMPLE_PATH, type=pathlib.Path)
    print(make_example(parser.parse_args(argv).path))


if __name__ == "__main__":
    main()
