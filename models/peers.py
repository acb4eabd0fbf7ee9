"""Other pruning tools run on the same models, at the same FLOPs targets, for the accuracy benchmark.

- **onnxsim 0.8.1** (``onnxsim.pruning``): ONNX in, like spa-prune.  Its own pipeline: ``simplify``
  first (folds the weight ``Constant`` nodes of Paddle exports into initializers and BatchNorm into
  the convolutions; without it, it finds almost nothing to prune in these models), then structured channel pruning
  (``apply_structured_pruning_cpp``, L2 norm of each channel's weights, data-free) and attention
  head pruning (``apply_attention_head_pruning_cpp``), or their calibrated Wanda versions
  (``||W_row|| * ||X||``) followed by ``apply_pruning_finetune``, its least-squares re-fit of the
  MatMul/Gemm layers against the original activations.  It removes the same fraction
  ``sparsity`` of every chain it matches, so the channel counts depend on ``sparsity`` only; one
  search over ``sparsity`` (data-free) serves both variants.
- **Torch-Pruning 1.6.1**: PyTorch in, for tasks with a PyTorch model (``Task.torch_prune``),
  its pruning ratio searched the same way (``match_target``).

Achieved FLOPs are counted on every output by spa-prune's own cost model (``flops_of``), the
count spa-prune's own ratios use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from spa_compiler import CostModel, analyze

from .tasks import Shapes

__all__ = ["PeerError", "match_target", "flops_of", "onnxsim_prune", "onnxsim_simplify"]

MAX_SPARSITY = 0.95
SEARCH_STEPS = 6
TOLERANCE = 0.005
CALIBRATION_BATCH = 16


class PeerError(RuntimeError):
    """A peer tool cannot produce a model for a target."""


def flops_of(path: str | Path, shapes: Shapes) -> float:
    """MACs of the ONNX model at ``path`` with its inputs bound to ``shapes`` (spa-prune's cost model)."""
    return CostModel(analyze(path, shapes), "flops").total


def match_target(measure: Callable[[float], float], target: float, high: float = MAX_SPARSITY,
                 steps: int = SEARCH_STEPS, tolerance: float = TOLERANCE) -> tuple[float, float]:
    """``(amount, achieved ratio)`` of the pruning amount in ``[0, high]`` whose FLOPs ratio
    ``measure(amount)`` (decreasing in ``amount``, 1 at 0) comes closest to ``target``, at or
    below it on ties.  Tries ``high`` first (when even that misses the target, it is the closest
    the tool gets), then up to ``steps`` amounts interpolated linearly inside the bracket around
    the target (each kept within its middle 80%, so a steep step cannot stall the search),
    stopping within ``tolerance`` of the target."""
    tried = {high: measure(high)}
    low, low_ratio, high_ratio = 0.0, 1.0, tried[high]
    for _ in range(steps if high_ratio < target else 0):
        fraction = min(max((low_ratio - target) / max(low_ratio - high_ratio, 1e-9), 0.1), 0.9)
        amount = low + fraction * (high - low)
        ratio = tried[amount] = measure(amount)
        if abs(ratio - target) <= tolerance:
            break
        if ratio > target:
            low, low_ratio = amount, ratio
        else:
            high, high_ratio = amount, ratio
    amount = min(tried, key=lambda a: (abs(tried[a] - target), tried[a] > target))
    return amount, tried[amount]


def onnxsim_simplify(source: Path, output: Path) -> Path:
    """``onnxsim.simplify`` of ``source`` saved to ``output``: the model onnxsim's pruning works on."""
    import onnxsim

    model, checked = onnxsim.simplify(str(source))
    if not checked:
        raise PeerError("onnxsim.simplify could not verify its output")
    onnx.save(model, str(output))
    return output


def _batches(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``inputs`` in batches of ``CALIBRATION_BATCH`` samples, or of one when the model's
    first input declares a batch of 1 (ddddocr's)."""
    first = model.graph.input[0].type.tensor_type.shape.dim
    step = 1 if first and first[0].dim_value == 1 else CALIBRATION_BATCH
    count = len(next(iter(inputs.values())))
    return [{name: array[start : start + step] for name, array in inputs.items()} for start in range(0, count, step)]


def onnxsim_prune(simplified: Path, sparsity: float, output: Path,
                  calibration: dict[str, np.ndarray] | None = None) -> Path:
    """onnxsim's channel and head pruning of ``simplified`` at ``sparsity``, saved to ``output``:
    L2 magnitude without ``calibration``; with it, Wanda scores on those inputs (axis 0 = samples)
    and then the least-squares re-fit of the MatMul/Gemm layers."""
    import onnxsim

    model = onnx.load(str(simplified))
    if calibration is None:
        pruned = onnxsim.apply_structured_pruning_cpp(model, sparsity=sparsity)
        pruned = onnxsim.apply_attention_head_pruning_cpp(pruned, sparsity=sparsity)
    else:
        batches = _batches(model, calibration)
        pruned = onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)
        pruned = onnxsim.apply_attention_head_wanda_pruning(pruned, calibration_data=batches, sparsity=sparsity)
        pruned = onnxsim.apply_pruning_finetune(model, pruned, calibration_data=batches)
    onnx.save(pruned, str(output))
    return output
