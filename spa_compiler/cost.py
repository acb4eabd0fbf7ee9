"""Exact cost model: multiply-accumulates and parameters as functions of channel counts.

Both costs are sums of products of axis sizes. A Conv costs ``|Y| * |W| / Co`` MACs, i.e. the
product of the sizes of Y's axes and W's axes 1..; a Gemm or MatMul ``|Y| * K``; a constant tensor
holds the product of its axis sizes in parameters. Each term is a list of axis ids, so the cost
after removing channels is the same sum with each axis' *kept* size, and removing a unit changes
only the terms that contain one of its axes. "FLOPs" targets in spa-prune are MAC ratios of the
Conv, ConvTranspose, Gemm and MatMul nodes, which dominate the compute of these models;
element-wise ops scale with the same channel counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .analysis import Analysis
from .ops import get_rule

__all__ = ["CostModel", "CostKind", "node_macs"]

CostKind = Literal["macs", "params"]


@dataclass
class _Term:
    name: str
    axes: list[int]


class CostModel:
    """MACs or parameter count of a model as channels are removed."""

    def __init__(self, analysis: Analysis, kind: CostKind) -> None:
        self.kind = kind
        self.terms = _macs_terms(analysis) if kind == "macs" else _param_terms(analysis)
        self.kept = np.asarray([ref.size for ref in analysis.axes], dtype=np.float64)
        self.values = np.asarray([self._value(t) for t in self.terms], dtype=np.float64)
        self.terms_of_axis: dict[int, list[int]] = {}
        for k, term in enumerate(self.terms):
            for axis in set(term.axes):
                self.terms_of_axis.setdefault(axis, []).append(k)
        self.original_total = float(self.values.sum())

    def _value(self, term: _Term, minus: dict[int, int] | None = None) -> float:
        minus = minus or {}
        return math.prod(self.kept[a] - minus.get(a, 0) for a in term.axes)

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
    return CostModel(analysis, "macs").per_term()


def _macs_terms(analysis: Analysis) -> list[_Term]:
    graph = analysis.graph
    terms = []
    for node in graph.nodes:
        rule = get_rule(node.domain, node.op_type, graph.opset)
        if rule is None or any(n and n not in graph.shapes for n in [*node.inputs, *node.outputs]):
            continue
        axes = rule.macs_axes(node, graph.shapes.__getitem__)
        if axes:
            terms.append(_Term(node.name, [analysis.axis_index[(t, a)] for t, a in axes]))
    return terms


def _param_terms(analysis: Analysis) -> list[_Term]:
    graph = analysis.graph
    terms = []
    for name, value in graph.constants.items():
        if not np.issubdtype(value.dtype, np.floating) or name not in graph.consumers:
            continue
        axes = [analysis.axis_index.get((name, k)) for k in range(value.ndim)]
        if any(a is None for a in axes):
            continue
        terms.append(_Term(name, axes))
    return terms
