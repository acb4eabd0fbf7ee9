"""Test helpers: seeded weights, and the exactness check of DESIGN invariant 3.

Exactness: choose channels to remove, zero every weight slab that *reads* them (Conv/Gemm/MatMul
input slices), then prune. The removed channels had no effect on the outputs, so the pruned
model must reproduce the zeroed model's outputs. Any wrong index map, stale attribute or
mis-sliced constant shows up as a difference.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from models.exactness import RTOL, randomize_weights, relative_error, semantic_outputs, zero_readers
from spa_compiler import Graph, PruneConfig, prune_graph, synthetic_inputs
from spa_compiler.rewrite import rewrite_model
from spa_compiler.verify import run_model

__all__ = [
    "randomize_weights", "assert_exact", "relative_error",
    "assert_checker_passes_unless_input_fails", "EXAMPLE", "dynamic_example_file",
]

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "mini_resnet.onnx"


def dynamic_example_file(folder: Path) -> Path:
    """The example model as ``folder/dyn.onnx`` with its input ``[N, 3, H, W]`` and output
    ``[N, 10]``: batch, height and width free, as a dynamic export declares them."""
    model = onnx.load(str(EXAMPLE))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((0, "N"), (2, "H"), (3, "W")):
        dims[axis].Clear()
        dims[axis].dim_param = name
    batch = model.graph.output[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_param = "N"
    onnx.save(model, str(folder / "dyn.onnx"))
    return folder / "dyn.onnx"


def assert_checker_passes_unless_input_fails(original: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    """The full checker passes on the pruned model, or fails exactly as on the input model
    (e.g. onnx deprecates GroupNormalization-18, which onnxruntime still runs)."""
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).splitlines()[0]
        with pytest.raises(onnx.checker.ValidationError, match=re.escape(first)):
            onnx.checker.check_model(original, full_check=True)


def assert_exact(graph: Graph, config: PruneConfig, rtol: float = RTOL, seed: int = 0) -> onnx.ModelProto:
    """Prune with ``config``, after zeroing what reads the removed channels; outputs must match
    within ``rtol`` (relative L2), both models run without onnxruntime's graph optimisations
    (:func:`models.exactness.semantic_outputs`). Returns the pruned model."""
    result = prune_graph(graph, config)
    analysis = result.analysis
    assert result.plan.n_removed > 0, "the plan removes nothing: the test would prove nothing"
    zero_readers(graph, analysis, result.removed_by_axis)
    pruned = rewrite_model(analysis, result.removed_by_axis)
    assert_checker_passes_unless_input_fails(graph.model, pruned)
    feeds = synthetic_inputs(graph.input_shapes, graph.dtypes, seed)
    run_model(pruned, feeds)  # the pruned model runs optimised, as users run it
    expected, actual = semantic_outputs(graph.model, feeds), semantic_outputs(pruned, feeds)  # as the graphs compute
    error = relative_error(expected, actual)
    assert error <= rtol, f"pruned outputs differ from the zeroed original: relative error {error:.3g}"
    return pruned
