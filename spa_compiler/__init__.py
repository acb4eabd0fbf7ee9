"""spa-prune: a structured pruning compiler for ONNX models.

    >>> from spa_compiler import PruneConfig, prune
    >>> report = prune("model.onnx", "small.onnx", PruneConfig(flops=0.5))  # doctest: +SKIP
    >>> report.flops_ratio  # doctest: +SKIP
    0.49...

``prune`` runs a pipeline of passes (``pipeline``, ``stages``, ``api``) over a pruning state
(``state``): it loads and folds the model (``ir``), couples channels across the graph with the
op-rule registry (``ops``, ``analysis``), scores groups with a registered criterion
(``criteria``; the built-in ones live in ``spa_compiler.passes``), chooses what to remove
(``cost``, ``allocate``), rewrites a dense smaller model (``rewrite``) and verifies it
(``verify``) before writing it atomically and reporting (``report``).
"""

from __future__ import annotations

from .allocate import Constraints, Plan, Target
from .analysis import Analysis, Group, Unit, analyze_graph
from .cost import CostModel
from .criteria import Criterion, ScoreContext, available_criteria, get_criterion, register_criterion
from .errors import (
    InputError,
    ModelError,
    OutputError,
    SpaError,
    TargetError,
    UnsupportedModelError,
    VerificationError,
)
from .ir import Graph, load_model
from .shapes import parse_input_shapes, synthetic_inputs
from .model_files import save_model
from .ops import OpRule, register_op, registered_ops
from .api import analyze, default_passes, prune, prune_graph
from .config import PruneConfig
from .pipeline import Pass, Pipeline, PipelineError
from .report import PruneReport
from .state import PruneState
from .versions import __version__

__all__ = [
    "__version__",
    "Analysis", "Constraints", "CostModel", "Criterion", "Graph", "Group", "InputError", "ModelError",
    "OpRule", "OutputError", "Pass", "Pipeline", "PipelineError", "Plan", "PruneConfig", "PruneReport",
    "PruneState", "ScoreContext", "SpaError", "Target", "TargetError", "Unit", "UnsupportedModelError",
    "VerificationError", "analyze", "analyze_graph", "available_criteria", "default_passes", "get_criterion", "load_model",
    "parse_input_shapes", "prune", "prune_graph", "register_criterion", "register_op",
    "registered_ops", "save_model", "synthetic_inputs",
]
