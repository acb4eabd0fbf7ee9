"""The ``spa-prune`` command from a source checkout: ``python cli.py MODEL.onnx --flops 0.5``.
The command's code is :mod:`spa_compiler.cli`."""

from spa_compiler.cli import main

if __name__ == "__main__":
    main()
