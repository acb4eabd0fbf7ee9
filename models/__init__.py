"""Development tooling for spa-prune (not installed): seeded PyTorch reference architectures
(``zoo``), ONNX export (``export``), real models shipped in PyPI packages (``real``), accuracy
tasks with ground truth (``tasks``, ``ocr_tasks``, ``minilm_task``, ``digits_task``), the
exactness harness and graph fuzzer (``exactness``, ``fuzz``), and the benchmarks, each run as
``python -m models.NAME``. Import the submodule you need: only some of them need PyTorch."""

import onnxruntime

# The benchmarks own their processes, as the CLI does its own: onnxruntime's optimiser notes on
# nodes it leaves (one per model onnx-graphsurgeon folds) would bury their progress lines.
onnxruntime.set_default_logger_severity(3)
