"""Re-fitting toward the original outputs on the pruned network's own inputs.

Compensation from the original network's statistics (:class:`~spa_compiler.passes.obs.OBSCompensation`)
re-fits each layer as if its input were unchanged; but every pruned layer before it changes that
input, and errors add up through the depth of the network. This pass re-fits every consumer
layer (Conv, Gemm, MatMul with a constant weight) of the *pruned* network so that, on the
calibration inputs, its outputs match the *original* layer's outputs. For a layer with original
augmented weights ``W`` (bias last), original input features ``x`` and pruned input features
``x̃`` (both with a constant 1 appended), the least-squares solution of
``min Σ ‖W x − W̃ x̃‖²`` is

    W̃ = (W Cᵀ + P D) (G̃ + D)⁻¹,   C = Σ x̃ xᵀ,   G̃ = Σ x̃ x̃ᵀ,   D = λ mean(diag G̃) diag(1, ..., 1, 0)

a ridge regression pulled toward the layer's present weights ``P`` (kept columns; the bias is
not pulled), so that where the calibration rows are few the re-fit stays near them (a layer
without a bias drops the constant feature: its bias stays as it was). How strong a pull, or
whether to re-fit only the bias or nothing at all, each layer decides on held-out rows: the
rows come in two folds (alternate batches of samples), each candidate is fitted on one and
its output error measured on the other, both ways, and the least error wins (of the ridges,
only those on the way downhill from the middle one are fitted: :func:`least_ridge`). So a layer whose
rows are too few for its features (a 1536-wide layer on a few thousand tokens) does not
over-fit them. A layer reading more than ``MAX_FEATURES`` features (AlexNet's first classifier
layer reads 9,216) keeps its compensated weights: its sums would take gigabytes. Every layer is
re-fitted in dependency order, stage by stage, each stage on the inputs that the already
re-fitted stages before it produce: the sequential re-fit of OBC and SparseGPT. A stage is a run
of consecutive *levels* (layers of one level never feed each other); at most ``STAGES`` of them,
since each costs a run of the pruned network up to the stage's layers over its samples
(:func:`~spa_compiler.subnetwork.prefix_model`; the re-fitted weights are graph inputs, fed anew
at each stage), so a 27-level detector re-fits in 16 runs instead of 27. The original network
runs once for all stages (on each batch they use), every layer's rows drawn then and its
original features there kept (:class:`~spa_compiler.paired.PairedRunner`); a batch holds as
many samples as keep the layer inputs a run returns within ``RUN_BYTES`` (PP-OCRv4's detector
at 640×640: 4 samples, 3.1 GB at the peak of its whole pruning instead of 6.1 GB with 16).
``rounds`` repeats the sequence. A stage draws its layers' rows (at most ``ROWS_PER_FEATURE`` per
feature, spread evenly) from every calibration sample the runs can afford: rows from many
samples vary as the data does, where rows from many positions of a few samples do not (magika's
file-type classifier at ``--flops`` 0.5, calibrated on 167 files written a type at a time, its
convolution re-fitted on rows from the first 8, all C sources, read 0.70 of its test files
right; from all of them, 0.86). The runs may cost
at most ``budget`` MACs (``BUDGET_MACS``: :func:`stage_samples` caps the stages' samples, at
``SAMPLES`` at least), so a 4-GMAC ResNet-50 re-fits on fewer samples than it is given (the
held-out choice then keeps fewer parameters). The bias term also corrects the
shift of every output's mean that removed channels and upstream errors leave. A layer whose
output is added to a residual stream is fitted toward its original output plus the stream's
error there (:mod:`~spa_compiler.residual_target`): the block's sum, not the layer's term, is
matched.

Data-free, the rows are synthetic inputs (:mod:`spa_compiler.synthetic`), and a re-fit that
matches the original layers on them can still miss on real inputs, which held-out synthetic
rows do not show: each layer then moves only ``SYNTHETIC_TRUST`` of the way from its present
weights ``P`` to the re-fitted ones, ``P + t (W̃ − P)``, a shrinkage toward the compensated
weights, and the held-out choice weighs each candidate as so applied. On the accuracy benchmark
(``obs_joint``, data-free, ``--flops`` 0.75 / 0.5) the PP-OCRv4 recogniser reads 0.978 / 0.855
of its characters with half the step, 0.968 / 0.514 with the whole step and 0.975 / 0.905 with
none; the direction classifier keeps 0.960 / 0.810 (whole step 0.965 / 0.830, none 0.955 /
0.710); the detector, the digits ResNet and MiniLM are within 0.003 of the whole step. At 0.5 a
quarter step gives 0.896 and 0.760, three quarters 0.738 and 0.840. With ``--calib`` the rows
are the user's own and the whole step is taken.

Layers whose weight is shared with another node are left alone: one re-fit cannot serve both.
"""

from __future__ import annotations

import logging
from collections import ChainMap, Counter
from collections.abc import Callable

import numpy as np

from .batch_axis import samples_per_run
from .calibrate import ConsumerLayer
from .cost import node_macs
from .paired import PairedRunner, PairedStatistics
from .pipeline import Pass
from .quantized import as_stored
from .residual_target import extended_target, residual_stream
from .rewrite import rewrite_model, slice_constant
from .secondorder import augmented, feature_columns
from .state import PruneState
from .subnetwork import part_macs, prefix_nodes

log = logging.getLogger(__name__)

__all__ = [
    "Refit", "refit_layer", "held_out_ridge", "least_ridge", "layer_levels", "stages", "stage_samples", "SAMPLES", "RIDGES",
    "SYNTHETIC_TRUST",
]

SAMPLES = 8  # calibration samples a re-fit stage uses at least, whatever the budget
STAGES = 16  # sequential re-fit stages at most (consecutive levels merged)
ROWS_PER_FEATURE = 4  # rows of a layer's features per feature: a well-posed ridge regression
BUDGET_MACS = 5e11  # MACs the re-fit's network runs may take (about 15 s of onnxruntime on two cores)
RUN_BYTES = 256 << 20  # layer inputs one run returns, at most (two runs are in flight; see batch_axis.samples_per_run)
MAX_FEATURES = 5792  # a wider layer is not re-fitted: its sums per fold (4 (f + 1)² floats) would pass 1 GiB


RIDGES = (0.001, 0.01, 0.1, 1.0, 10.0, "scales", "bias only", "unchanged")
"""The re-fits a layer may take: a ridge ``λ`` (in units of ``s = mean(diag G̃)``) on the weights,
the bias free; one scale per input feature of the present weights, then the bias; the present
weights with only the bias re-fitted (the shift of the outputs' mean corrected); or the layer
left as it is. Fewer parameters need fewer rows: a scale per feature is what a layer on a few
thousand tokens can afford."""

FEW_PARAMETERS = ("scales", "bias only", "unchanged")
"""The re-fits a layer with fewer rows than features may take: a weight per feature and output
would be fitted to fewer rows than it has parameters (a ResNet-50's classifier on the few samples
its stage can afford), so the held-out choice need not weigh those, whose solves cost the most."""

SCALE_RIDGE = 0.001  # pull of the feature scales toward 1, in units of mean(diag M)
SYNTHETIC_TRUST = 0.5  # share of the way from the present weights to the re-fitted ones, data-free


def _feature_scales(gram: np.ndarray, target_cross: np.ndarray, prior: np.ndarray, bias: bool,
                    prior_gram: np.ndarray) -> np.ndarray:
    """The feature scales ``a`` minimising ``Σ ‖W x − b − P diag(a) x̃‖²`` over the weight
    features (``b``, the bias of ``P``, kept): ``(M ∘ G̃) a = diag(Pᵀ (C Wᵀ)ᵀ) − (Pᵀ b) ∘ Σx̃``
    with ``M = PᵀP`` over the weight features (``prior_gram``), pulled toward ``a = 1`` by
    ``SCALE_RIDGE``."""
    features = len(prior_gram)
    weights = prior[:, :features]
    system = prior_gram * gram[:features, :features]
    target = np.sum(target_cross[:features] * weights.T, axis=1)
    if bias:
        target -= (weights.T @ prior[:, -1]) * gram[:features, -1]
    pull = SCALE_RIDGE * max(float(np.diag(system).mean()), 1e-30)
    return np.linalg.solve(system + pull * np.eye(features), target + pull)


def _few_parameters(kind: str, gram: np.ndarray, target_cross: np.ndarray, prior: np.ndarray, bias: bool,
                    prior_gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The scales ``a`` and bias ``b̃`` of a few-parameter re-fit ``[P diag(a), b̃]`` (no bias
    without one): "unchanged" ``a = 1``, ``b̃ = b``; "bias only" ``a = 1`` and the mean residual
    added to the bias, ``b̃ = b + (W Σx − P Σx̃) / n`` (``Σx̃`` and ``n`` are the last row of
    ``G̃``, ``W Σx`` the last row of ``C Wᵀ``); "scales" ``a`` from :func:`_feature_scales`,
    then the bias of ``P diag(a)`` so corrected (``prior_gram``, ``PᵀP`` over the weight features,
    is what the scales' solve needs; computed when not given)."""
    features = prior.shape[1] - 1 if bias else prior.shape[1]
    if kind == "scales":
        if prior_gram is None:
            prior_gram = prior[:, :features].T @ prior[:, :features]
        scales = _feature_scales(gram, target_cross, prior, bias, prior_gram)
    else:
        scales = np.ones(features)
    if not bias:
        return scales, None
    shifted = prior[:, -1]
    if kind != "unchanged":
        present_mean = prior[:, :features] @ (scales * gram[-1, :features]) + shifted * gram[-1, -1]
        shifted = shifted + (target_cross[-1] - present_mean) / gram[-1, -1]
    return scales, shifted


def _few_parameter_error(scales: np.ndarray, shifted: np.ndarray | None, prior: np.ndarray, prior_gram: np.ndarray,
                         gram: np.ndarray, target_cross: np.ndarray) -> float:
    """:func:`_output_error` of ``W̃ = [P diag(a), b̃]`` without forming it, from ``M = PᵀP``:
    ``aᵀ (M ∘ G̃_ww) a + 2 aᵀ (g ∘ Pᵀb̃) + c ‖b̃‖² − 2 (aᵀ d + b̃ · r)``, where ``G̃ = [G̃_ww, g; gᵀ, c]``,
    ``r`` is the last row of ``C Wᵀ`` and ``d_i = Σ_k P_ki (C Wᵀ)_ik``: products over the
    features and rows once, not over rows and features squared per candidate."""
    features = len(scales)
    weights = prior[:, :features]
    quadratic = scales @ (prior_gram * gram[:features, :features]) @ scales
    linear = scales @ np.sum(target_cross[:features] * weights.T, axis=1)
    if shifted is not None:
        quadratic += 2 * scales @ (gram[:features, -1] * (weights.T @ shifted)) + gram[-1, -1] * (shifted @ shifted)
        linear += shifted @ target_cross[-1]
    return float(quadratic - 2 * linear)


def _refit(gram: np.ndarray, target_cross: np.ndarray, prior: np.ndarray, ridge: float | str, bias: bool) -> np.ndarray:
    """The re-fitted augmented weights for ``target_cross = C Wᵀ``: for a number ``λ``,
    ``(W Cᵀ + P D)(G̃ + D)⁻¹`` with ``D = λs diag(1, ..., 1, 0)`` (the bias, last, not pulled);
    for a few-parameter re-fit, ``[P diag(a), b̃]`` of :func:`_few_parameters`."""
    if isinstance(ridge, str):
        features = prior.shape[1] - 1 if bias else prior.shape[1]
        scales, shifted = _few_parameters(ridge, gram, target_cross, prior, bias)
        return np.hstack([prior[:, :features] * scales, shifted[:, None]]) if bias else prior * scales
    penalty = _penalty(gram, ridge, bias)
    return np.linalg.solve(gram + np.diag(penalty), target_cross + penalty[:, None] * prior.T).T


def _penalty(gram: np.ndarray, ridge: float, bias: bool) -> np.ndarray:
    """The diagonal of ``D = λs diag(1, ..., 1, 0)`` (``s = mean(diag G̃)``; the bias not pulled)."""
    diagonal = np.diag(gram)
    penalty = np.full(len(gram), ridge * (float(diagonal.mean()) if diagonal.size and diagonal.mean() > 0 else 1.0))
    if bias:
        penalty[-1] = 0.0
    return penalty


def _applied(solution: np.ndarray, prior: np.ndarray, trust: float) -> np.ndarray:
    """The weights a re-fit leaves: ``P + t (W̃ − P)`` (``t = 1``: the re-fit itself)."""
    return solution if trust == 1.0 else prior + trust * (solution - prior)


def _traced_errors(gram: np.ndarray, cross: np.ndarray, target: np.ndarray, prior: np.ndarray, bias: bool,
                   trust: float = 1.0) -> Callable[[float], float]:
    """The held-out error of :func:`held_out_ridge` as a function of the ridge ``λ``, without
    forming the re-fitted weights. With ``V = [Wᵀ; Pᵀ]`` and ``Y = (G̃_a + D)⁻¹ [C_a, D]``, the
    weights fitted on fold ``a`` are ``W̃ᵀ = Y V`` and their error on fold ``f`` is
    ``Σ (Yᵀ G̃_f Y) ∘ (V Vᵀ) − 2 Σ Y ∘ (C_f W Vᵀ)`` (``W Vᵀ``: the rows of ``V Vᵀ`` for ``W``):
    products over the features only, where forming ``W̃`` costs products over its output rows
    (a convolution with channel statistics has one per output and kernel position); ``V Vᵀ``
    is computed once for every ``λ``. The weights applied with ``trust`` t,
    ``P + t (W̃ − P)``, are ``Y' V`` with ``Y' = [t Y_C, t Y_D + (1 − t) I]``."""
    stacked = np.hstack([target, prior])
    outer = stacked.T @ stacked  # V Vᵀ
    against = [cross[f] @ outer[: target.shape[1]] for f in (0, 1)]  # C_f W Vᵀ

    def error(ridge: float) -> float:
        total = 0.0
        for f in (0, 1):
            penalty = _penalty(gram[1 - f], ridge, bias)
            y = np.linalg.solve(gram[1 - f] + np.diag(penalty), np.hstack([cross[1 - f], np.diag(penalty)]))
            if trust != 1.0:
                y *= trust
                y[:, target.shape[1]:] += (1.0 - trust) * np.eye(len(y))
            total += float(np.sum((y.T @ gram[f] @ y) * outer) - 2 * np.sum(y * against[f]))
        return total

    return error


def _output_error(solution: np.ndarray, gram: np.ndarray, target_cross: np.ndarray) -> float:
    """``Σ ‖W x − W̃ x̃‖²`` over a fold's rows, up to the constant ``Σ ‖W x‖²``:
    ``tr(W̃ G̃ W̃ᵀ) − 2 tr(W̃ C Wᵀ)``."""
    return float(np.sum((solution @ gram) * solution) - 2 * np.sum(solution * target_cross.T))


def least_ridge(ridges: list[float], error: Callable[[float], float]) -> tuple[float, float]:
    """The ridge of ``ridges`` (increasing) with the least ``error``, and that error, found by
    walking downhill from the middle pair and evaluating only the ridges on the way (three or four
    of :data:`RIDGES`' five): the held-out error of a ridge regression as a rule falls and then
    rises with ``λ``, so the first ridge past which it rises is the least (on every layer of
    ResNet-50 and MiniLM, the one all five give). Ties go to the weaker ridge."""
    errors: dict[int, float] = {}

    def at(index: int) -> float:
        if index not in errors:
            errors[index] = error(ridges[index])
        return errors[index]

    index = (len(ridges) - 1) // 2
    step = -1 if index > 0 and at(index - 1) <= at(index) else 1
    while 0 <= index + step < len(ridges) and (at(index + step) <= at(index) if step < 0 else at(index + step) < at(index)):
        index += step
    return ridges[index], at(index)


def held_out_ridge(gram: np.ndarray, cross: np.ndarray, target: np.ndarray, prior: np.ndarray, bias: bool,
                   candidates: tuple[float | str, ...] = RIDGES, trust: float = 1.0) -> float | str:
    """The re-fit of ``candidates`` that, fitted on one fold and measured on the other (both
    ways), leaves the least output error: a layer whose rows are too few to re-fit (a wide
    layer on tokens, a classifier after pooling) keeps its present weights. ``gram`` and
    ``cross`` per fold, ``target`` the original weights ``W``; each candidate weighed as it is
    applied with ``trust`` (:func:`_applied`). Of the ridges, only the least one
    (:func:`least_ridge`) competes with the few-parameter re-fits; their errors come from
    :func:`_traced_errors` when the weights have more output rows than that computes products,
    the few-parameter ones' from :func:`_few_parameter_error`."""
    target_cross = cross @ target.T  # C Wᵀ per fold
    features, width = prior.shape[1], prior.shape[1] + target.shape[1]
    weight_features = features - 1 if bias else features
    prior_gram = prior[:, :weight_features].T @ prior[:, :weight_features]  # PᵀP, shared by the few-parameter fits
    traced = len(prior) > width + width**2 / (3 * features)  # cost of the two ways, per ridge and fold

    def direct(ridge: float) -> float:
        return sum(_output_error(_applied(_refit(gram[1 - f], target_cross[1 - f], prior, ridge, bias), prior, trust),
                                 gram[f], target_cross[f]) for f in (0, 1))

    def few(kind: str) -> float:
        total = 0.0
        for f in (0, 1):
            scales, shifted = _few_parameters(kind, gram[1 - f], target_cross[1 - f], prior, bias, prior_gram)
            if trust != 1.0:
                scales = 1.0 + trust * (scales - 1.0)
                shifted = None if shifted is None else prior[:, -1] + trust * (shifted - prior[:, -1])
            total += _few_parameter_error(scales, shifted, prior, prior_gram, gram[f], target_cross[f])
        return total

    ridges = [ridge for ridge in candidates if not isinstance(ridge, str)]
    error = _traced_errors(gram, cross, target, prior, bias, trust) if traced and ridges else direct
    errors = {ridge: few(ridge) for ridge in candidates if isinstance(ridge, str)}
    if ridges:
        best, errors[best] = least_ridge(ridges, error)
    return min(errors, key=lambda ridge: (errors[ridge], candidates.index(ridge)))


def refit_layer(layer: ConsumerLayer, weights: np.ndarray, current: np.ndarray, stats: PairedStatistics,
                removed_channels: np.ndarray, ridge: float | str | None = None,
                trust: float = 1.0) -> tuple[np.ndarray, np.ndarray, float | str]:
    """``(matrix, bias, ridge)`` of the re-fitted layer at the original shape: ``W̃`` placed in the
    kept feature columns (zeros in the removed ones, which the rewriter slices away). ``weights``
    is the layer's augmented original ``[rows, features + 1]`` matrix, ``current`` its present one
    (compensated or not), toward which the ridge term pulls (``P``, its kept columns): the re-fit
    ``ridge`` of :data:`RIDGES` over both folds' rows, the one given or else the one chosen on
    held-out rows (:func:`held_out_ridge`; among :data:`FEW_PARAMETERS` when the rows are fewer
    than the pruned layer's features). With ``trust`` below 1 the result is
    ``P + trust (W̃ − P)`` (synthetic rows: see the module docstring), and the held-out choice
    weighs each candidate so applied."""
    features = weights.shape[1] - 1
    rows = float(stats.gram[:, -1, -1].sum())
    kept = np.setdiff1d(np.arange(features), feature_columns(removed_channels, layer.features_per_channel))
    kept_columns = np.append(kept, features)  # and the bias
    target = extended_target(weights, stats.residual)  # [W, I, b] toward the residual stream's error too
    gram, cross, prior = stats.gram, stats.cross, current[:, kept_columns]
    if layer.bias is None:
        gram, cross, target, prior = gram[:, :-1, :-1], cross[:, :-1, :-1], target[:, :-1], prior[:, :-1]
    has_bias = layer.bias is not None
    if not (np.isfinite(gram).all() and np.isfinite(cross).all()):
        ridge = "unchanged"  # statistics that overflowed float64 fit nothing
    elif ridge is None and not (stats.gram[:, -1, -1] > 0).all():
        ridge = "unchanged"  # a fold without rows (a single calibration sample): nothing to choose on
    if ridge is None:
        ridge = held_out_ridge(gram, cross, target, prior, has_bias, RIDGES if rows > len(kept) else FEW_PARAMETERS, trust)
    solved = _applied(_refit(gram.sum(axis=0), cross.sum(axis=0) @ target.T, prior, ridge, has_bias), prior, trust)
    if not np.isfinite(solved).all():
        ridge, solved = "unchanged", prior
    matrix = np.zeros((len(weights), features))
    matrix[:, kept] = solved[:, : len(kept)]
    bias = solved[:, -1] if layer.bias is not None else weights[:, -1]
    return matrix, bias, ridge


def stage_samples(available: int, prefix_macs: list[float], total_macs: float, budget: float, least: int) -> int:
    """Samples every stage uses: all ``available``, or the most ``c`` (not below ``least``) for
    which the runs cost at most ``budget`` MACs: one run of the original network (``total_macs``
    per sample) and one of each stage's prefix (``prefix_macs`` per sample, the original
    network's: a bound on the pruned one's) over them, ``c · (M + Σ_k P_k)``."""
    per_sample = total_macs + sum(prefix_macs)
    affordable = int(budget // per_sample) if per_sample > 0 else available
    return min(available, max(least, affordable))


def layer_levels(graph, layers: list[ConsumerLayer]) -> list[list[ConsumerLayer]]:
    """The layers in dependency order, grouped: a layer's level is one more than the highest
    level of the layers its input depends on, so layers of one level never feed each other."""
    by_node = {layer.node: layer for layer in layers}
    depth: dict[str, int] = {}
    levels: dict[int, list[ConsumerLayer]] = {}
    for node in graph.nodes:
        below = max((depth.get(name, 0) for name in node.inputs if name), default=0)
        if node.name in by_node:
            levels.setdefault(below, []).append(by_node[node.name])
            below += 1
        for name in node.outputs:
            depth[name] = below
    return [levels[k] for k in sorted(levels)]


def stages(levels: list[list[ConsumerLayer]], count: int) -> list[list[ConsumerLayer]]:
    """``levels`` merged into at most ``count`` runs of consecutive levels, of near-equal length."""
    bounds = np.linspace(0, len(levels), min(count, len(levels)) + 1).round().astype(int)
    return [[layer for level in levels[a:b] for layer in level] for a, b in zip(bounds[:-1], bounds[1:])]


def residual_streams(graph, sequence: list[list[ConsumerLayer]]) -> dict[str, str]:
    """The residual stream each layer's re-fit also corrects (:mod:`~spa_compiler.residual_target`),
    by node: only a stream that no layer of the layer's own stage computes, since the stage's
    layers are re-fitted together and the stream's error is measured before."""
    streams = {}
    for stage in sequence:
        nodes = {layer.node for layer in stage}
        for layer in stage:
            stream = residual_stream(graph, layer)
            if stream and not nodes & {node.name for node in prefix_nodes(graph.model, [stream])}:
                streams[layer.node] = stream
    return streams


class Refit(Pass):
    """Sequential re-fitting of every consumer layer on the pruned network's inputs, stage by
    stage (see the module docstring); ``rounds`` repeats the whole sequence."""

    name, description = "refit", "re-fitting layers on the pruned network's inputs"
    requires = ("graph", "analysis", "statistics", "calibration_data", "removed_by_axis")
    provides = ("compensated",)

    def __init__(self, rounds: int = 1, samples: int = SAMPLES, stage_count: int = STAGES,
                 budget: float = BUDGET_MACS, residual: bool = True, synthetic_trust: float = SYNTHETIC_TRUST) -> None:
        self.residual = residual
        self.synthetic_trust = synthetic_trust
        self.rounds = rounds
        self.samples = samples
        self.stage_count = stage_count
        self.budget = budget

    def run(self, state: PruneState) -> PruneState:
        if not state.calibration_data:
            return state  # nothing to run the model on (custom ops onnxruntime cannot run)
        analysis, graph, config = state.analysis, state.graph, state.config
        layers = [
            s.layer for s in state.statistics.values()
            if len(graph.consumers.get(s.layer.weight, [])) == 1 and s.layer.features(graph) <= MAX_FEATURES
        ]
        refitted = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
        pruned = rewrite_model(analysis, state.removed_by_axis, state.compensated)
        sequence = stages(layer_levels(graph, layers), self.stage_count)
        streams = residual_streams(graph, sequence) if self.residual else {}
        returned = {layer.activation for layer in layers} | set(streams.values())
        batch = samples_per_run(graph, config.calibration_batch, returned, RUN_BYTES)
        runner = PairedRunner(graph, pruned, layers, refitted, batch, streams)
        available = len(next(iter(state.calibration_data.values())))
        macs = node_macs(analysis)
        prefixes = [prefix_nodes(graph.model, sorted({layer.activation for layer in stage})) for stage in sequence]
        count = stage_samples(available, [part_macs(nodes, macs) for nodes in prefixes], sum(macs.values()), self.budget,
                              min(self.samples, available))
        counts = [count] * len(sequence)
        log.info("re-fit stages' samples: %s; %d layers fitted toward their residual sums", counts, len(streams))
        state.note("re-fitting layers: running the original network")
        runner.cache_original(list(zip(sequence, counts)), state.calibration_data, config.seed, ROWS_PER_FEATURE)
        chosen: Counter[str] = Counter()
        for sweep in range(self.rounds):
            for step, (stage, samples) in enumerate(zip(sequence, counts)):
                state.note(f"re-fitting layers, stage {step + 1}/{len(sequence)} (sweep {sweep + 1}/{self.rounds})")
                weights = {
                    name: slice_constant(analysis, state.removed_by_axis, name,
                                         as_stored(graph, name, state.compensated.get(name, graph.constants[name])))
                    for name in refitted
                }
                data = {name: array[:samples] for name, array in state.calibration_data.items()}
                paired = runner.statistics(stage, data, weights)
                trust = 1.0 if config.calibration else self.synthetic_trust
                chosen.update(self._apply(state, layer, paired[layer.node], trust) if layer.node in paired else "unpaired"
                              for layer in stage)
        log.info("re-fit chosen on held-out rows: %s", ", ".join(f"{n} {kind}" for kind, n in chosen.most_common()))
        return state

    @staticmethod
    def _apply(state: PruneState, layer: ConsumerLayer, paired: PairedStatistics, trust: float) -> str:
        """Re-fit one layer (``trust``: see :func:`refit_layer`); returns the kind of re-fit chosen
        (a ridge is "weights")."""
        constants = state.graph.float_constants
        axis = state.analysis.axis_id(layer.weight, layer.axis)
        removed = state.removed_by_axis.get(axis, np.zeros(0, dtype=np.int64))
        current = augmented(layer, ChainMap(state.compensated, constants))  # no lookup of every constant
        matrix, bias, ridge = refit_layer(layer, augmented(layer, constants), current, paired, removed, trust=trust)
        if ridge == "unchanged":
            return "unchanged"  # its own held-out rows say a re-fit would not help
        state.compensated[layer.weight] = layer.from_matrix(matrix, constants[layer.weight])
        if layer.bias is not None:
            state.compensated[layer.bias] = layer.bias_from_rows(bias, constants[layer.bias])
        return ridge if isinstance(ridge, str) else "weights"
