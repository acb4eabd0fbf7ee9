"""Per-node kernel times from onnxruntime's profiler, attributed to the nodes of the original graph.

onnxruntime optimises a graph before running it: it folds BatchNorm into convolutions, fuses
activations and residual Adds into them, and moves convolutions to its blocked NCHWc layout.
The profiler names each kernel it ran after a node of the optimised graph, which is named
after an original node or after the original tensor it writes (``<tensor>_nchwc``); a QDQ
convolution onnxruntime fuses into ``QLinearConv`` is named ``<node>_token_<n>``. A kernel
is attributed to the node of that name, else to the producer of that tensor; when the kernel's
op differs from that node's (a convolution named after the Relu fused into it), it goes to the
nearest compute node upstream, following first non-constant inputs. Kernels naming nothing of
the original graph (layout reorders onnxruntime inserts, nodes its fusions name anew) are not
attributed: :mod:`spa_compiler.latency` accounts for their time, with the session's overhead,
by scaling the attributed times to the measured whole-model latency.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .bench import Clock, time_rounds
from .ir import Graph, Node
from .verify import session_for

__all__ = ["profile_models", "attribute_kernel"]

_KERNEL = "_kernel_time"


def attribute_kernel(graph: Graph, compute: set[str], kernel: str, op: str) -> str | None:
    """The original node a kernel named ``kernel`` running ``op`` is charged to, or None."""
    base = re.sub(r"_token_\d+$", "", kernel.removesuffix("_nchwc"))
    node: Node | None = graph.node_by_name.get(kernel) or graph.node_by_name.get(base) or graph.producer.get(base)
    if node is None or node.name in compute or node.op_type == op:
        return node.name if node is not None else None
    fused = node
    while node is not None and node.name not in compute:
        data = [name for name in node.inputs if name and not graph.is_constant(name)]
        node = graph.producer.get(data[0]) if data else None
    return (node or fused).name


def _charged(graph: Graph, compute: set[str], events: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Milliseconds per inference charged to each node: per kernel the minimum over the measured
    inferences (the profiler times kernels by the wall clock, and other processes taking the core
    only ever add to that), summed per node."""
    durations: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith(_KERNEL):
            kernel = event["name"][: -len(_KERNEL)]
            durations[kernel].append(event["dur"])
            ops[kernel] = event.get("args", {}).get("op_name", "")
    times: dict[str, float] = defaultdict(float)
    for kernel, spent in durations.items():
        node = attribute_kernel(graph, compute, kernel, ops[kernel])
        if node is not None:
            times[node] += min(spent[warmup:] or spent) / 1e3
    return dict(times)


def profile_models(
    graph: Graph, models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], compute: set[str],
    runs: int = 15, warmup: int = 3, threads: int = 1, min_seconds: float = 2.0, clock: Clock = time.thread_time,
) -> tuple[list[dict[str, float]], list[float]]:
    """For each of ``models`` (``graph``'s model and pruned variants of it, same node names): the
    kernel milliseconds charged to each node of ``graph``, and the median milliseconds (by
    ``clock``) of a whole inference. Every model runs in two sessions, one with the profiler on
    and one without (the profiler adds a cost per kernel, a tenth of the latency of a narrow
    MobileNetV2), all of them in rounds (:func:`~spa_compiler.bench.time_rounds`)."""
    with tempfile.TemporaryDirectory(prefix="spa-prune-profile-") as folder:
        plain = [session_for(model, threads=threads) for model in models]
        profiled = [
            session_for(model, threads=threads, profile_prefix=str(Path(folder) / f"model{k}"))
            for k, model in enumerate(models)
        ]
        spent = time_rounds(plain + profiled, feeds, runs, warmup, min_seconds, clock)
        events = [json.loads(Path(session.end_profiling()).read_text()) for session in profiled]
    charged = [_charged(graph, compute, e, warmup) for e in events]
    return charged, [float(np.median(s) * 1e3) for s in spent[: len(models)]]
