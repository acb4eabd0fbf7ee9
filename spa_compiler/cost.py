"""Cost metrics: what a target counts, as functions of channel counts.

A metric turns an analysis into *terms*, each a list of axis ids and a function of those axes'
kept sizes; the model's cost is the sum of its terms. Removing channels changes only the terms
that contain one of their axes, which is what lets allocation recount costs cheaply after every
step. Metrics are registered by the name of their target option (``--flops``, ``--params``):

- ``flops``: multiply-accumulates of the Conv, ConvTranspose, Gemm and MatMul nodes (which
  dominate the compute of these models; element-wise ops scale with the same channel counts).
  A Conv costs ``|Y| * |W| / Co`` MACs, i.e. the product of the sizes of Y's axes and W's axes
  1..; a Gemm or MatMul ``|Y| * K``. Each term is the product of its axes' sizes, unless the op
  rule's ``macs_value`` says otherwise (an LSTM's ``seq * dirs * batch * 4H * (input + H)``).
  Nodes inside control-flow subgraphs count once per subgraph (an If: both branches).
- ``params``: every floating-point constant holds the product of its axis sizes.
- ``latency``: onnxruntime latency measured on this machine (:mod:`spa_compiler.latency`).

A new metric is a class with ``terms(analysis)``, registered with :func:`register_metric`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .analysis import Analysis
from .errors import InputError
from .ops import get_rule
from .plugins import register_named

__all__ = [
    "Term", "CostMetric", "CostModel", "register_metric", "get_metric", "available_metrics", "node_macs",
]


@dataclass
class Term:
    """One summand of a cost: ``value(sizes)`` of the kept sizes of ``axes`` (their product
    unless a metric says otherwise)."""

    name: str
    axes: list[int]
    value: Callable[[Sequence[float]], float] = math.prod


class CostMetric:
    """Base class of a metric: ``terms(analysis)`` lists its summands."""

    name = ""
    label = ""  # how the report names the quantity
    description = ""

    def terms(self, analysis: Analysis) -> list[Term]:
        raise NotImplementedError


_METRICS: dict[str, type[CostMetric]] = {}


def register_metric(name: str) -> Callable[[type[CostMetric]], type[CostMetric]]:
    """Class decorator registering a metric under the name of its target option."""

    def decorate(cls: type[CostMetric]) -> type[CostMetric]:
        return register_named(_METRICS, "cost metric", name, cls)

    return decorate


def get_metric(name: str, **options: Any) -> CostMetric:
    """A new instance of the metric registered as ``name``, given ``options`` (e.g. the
    ``latency`` metric's constraints and progress callback)."""
    if name not in _METRICS:
        raise InputError(f"unknown cost metric '{name}'; available: {', '.join(sorted(_METRICS))}")
    return _METRICS[name](**options)


def available_metrics() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(_METRICS.items())}


@register_metric("flops")
class MACs(CostMetric):
    label, description = "MACs", "multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul and RNN/GRU/LSTM nodes"

    def terms(self, analysis: Analysis) -> list[Term]:
        graph = analysis.graph
        terms = []
        for node in graph.nodes:
            rule = get_rule(node.domain, node.op_type, graph.opset)
            if rule is None or any(n and n not in graph.shapes for n in [*node.inputs, *node.outputs]):
                continue
            axes = rule.macs_axes(node, graph.shapes.__getitem__)
            if axes:
                terms.append(Term(node.name, [analysis.axis_index[(t, a)] for t, a in axes], rule.macs_value))
        return terms


@register_metric("params")
class Parameters(CostMetric):
    label, description = "parameters", "elements of the floating-point constants and integer weights"

    def terms(self, analysis: Analysis) -> list[Term]:
        graph = analysis.graph
        terms = []
        for name, value in graph.constants.items():
            weight = np.issubdtype(value.dtype, np.floating) or name in graph.integer_weights
            if not weight or name not in graph.consumers:
                continue
            axes = [analysis.axis_index.get((name, k)) for k in range(value.ndim)]
            if any(a is None for a in axes):
                continue
            terms.append(Term(name, axes))
        return terms


class CostModel:
    """A metric's cost of a model as channels are removed."""

    def __init__(self, analysis: Analysis, metric: CostMetric | str) -> None:
        self.metric = get_metric(metric) if isinstance(metric, str) else metric
        self.terms = self.metric.terms(analysis)
        self.kept = np.asarray([ref.size for ref in analysis.axes], dtype=np.float64)
        self.values = np.asarray([self._value(t) for t in self.terms], dtype=np.float64)
        self.terms_of_axis: dict[int, list[int]] = {}
        for k, term in enumerate(self.terms):
            for axis in set(term.axes):
                self.terms_of_axis.setdefault(axis, []).append(k)
        self.original_total = float(self.values.sum())

    def _value(self, term: Term, minus: dict[int, int] | None = None) -> float:
        minus = minus or {}
        return float(term.value([self.kept[a] - minus.get(a, 0) for a in term.axes]))

    @property
    def total(self) -> float:
        return float(self.values.sum())

    def saving(self, counts: dict[int, int]) -> float:
        """How much the total drops if ``counts[axis]`` more elements leave each axis."""
        affected = {k for axis in counts for k in self.terms_of_axis.get(axis, ())}
        return sum(self.values[k] - self._value(self.terms[k], counts) for k in affected)

    def remove(self, counts: dict[int, int]) -> None:
        affected = {k for axis in counts for k in self.terms_of_axis.get(axis, ())}
        for axis, count in counts.items():
            self.kept[axis] -= count
        for k in affected:
            self.values[k] = self._value(self.terms[k])

    def per_term(self) -> dict[str, float]:
        return {t.name: float(v) for t, v in zip(self.terms, self.values)}


def node_macs(analysis: Analysis) -> dict[str, float]:
    """MACs of every compute node at the model's bound shapes."""
    return CostModel(analysis, "flops").per_term()
