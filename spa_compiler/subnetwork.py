"""Parts of a network that onnxruntime runs on their own: the start up to some tensors, or the
end that some changed weights affect.

onnxruntime runs every node of a session's graph, whichever outputs a run asks for. A
measurement that needs only the inputs of a few layers (a re-fit stage) or only what follows
the layers it changes (a sensitivity measurement) pays for the whole network unless its session
holds just that part:

* :func:`prefix_model`: the nodes that the wanted tensors depend on, those tensors the outputs;
* :func:`tail_model`: the nodes that read some changed weights or depend on what those nodes
  compute, the model's outputs they affect; every other tensor they read (the *boundary*: graph
  inputs and activations of the start of the network) becomes a graph input, fed values
  computed once by the whole network.

A control-flow node reads the tensors its subgraphs read from the enclosing scope as well as
its own inputs. Both parts run exactly what the whole model would compute for those tensors.
"""

from __future__ import annotations

import onnx

from .subgraphs import defined_names, subgraphs_of, walk_nodes

__all__ = ["reads", "prefix_nodes", "prefix_model", "tail_nodes", "tail_model", "tail_boundary", "part_macs"]


def reads(node: onnx.NodeProto) -> set[str]:
    """The tensors of the enclosing graph ``node`` reads: its inputs and what its subgraphs read
    from outside themselves."""
    names = set(node.input)
    for sub in subgraphs_of(node):
        inner = {name for n in walk_nodes(sub) for name in n.input}
        names |= inner - set(defined_names(sub))
    names.discard("")
    return names


def _part(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """A model of ``nodes`` (in the model's order) with the initializers they read; of the
    ``inputs`` that are initializers (all of them before IR version 4), those it reads."""
    used = set().union(*(reads(node) for node in nodes)) if nodes else set()
    initializers = _initializers(model)
    inputs = [value for value in inputs if value.name not in initializers or value.name in used]
    graph = onnx.helper.make_graph(
        nodes, model.graph.name, inputs, outputs, [t for t in model.graph.initializer if t.name in used]
    )
    part = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    part.functions.extend(model.functions)
    return part


def prefix_nodes(model: onnx.ModelProto, outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes that ``outputs`` (graph inputs or activations) depend on, in model order."""
    producer = {name: node for node in model.graph.node for name in node.output if name}
    needed, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(reads(node))
    return [node for node in model.graph.node if id(node) in needed]


def prefix_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` computing ``outputs`` (:func:`prefix_nodes`), with all the graph
    inputs (so the same feeds serve)."""
    nodes = prefix_nodes(model, outputs)
    return _part(model, nodes, list(model.graph.input), [onnx.ValueInfoProto(name=name) for name in outputs])


def tail_nodes(model: onnx.ModelProto, changed: set[str]) -> list[onnx.NodeProto]:
    """The nodes that read the tensors ``changed`` (weights given new values) or depend on
    what such nodes compute, in model order."""
    changed = set(changed)
    tail = []
    for node in model.graph.node:  # topological order: a node's inputs are produced before it
        if reads(node) & changed:
            tail.append(node)
            changed.update(name for name in node.output if name)
    return tail


def tail_model(model: onnx.ModelProto, changed: set[str], dtypes: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """``(part, boundary)``: the part of ``model`` that the tensors ``changed`` affect
    (:func:`tail_nodes`), computing those of the model's outputs that depend on them (the others
    are unchanged), and the names of its non-constant inputs: graph inputs and activations of the
    rest of the network (``dtypes`` gives their element types), the part's graph inputs with
    their shapes left free. Initializers declared as graph inputs (weights fed at run time) stay
    inputs when the part reads them."""
    nodes = tail_nodes(model, changed)
    produced = {name for node in nodes for name in node.output}
    graph_inputs = {value.name: value for value in model.graph.input}
    weights = sorted(name for name in _outer_reads(nodes) if name in graph_inputs and name in _initializers(model))
    boundary = tail_boundary(model, nodes)
    inputs = [
        graph_inputs.get(name) or onnx.helper.make_tensor_value_info(name, dtypes[name], None) for name in boundary
    ]
    inputs += [graph_inputs[name] for name in weights]
    outputs = [value for value in model.graph.output if value.name in produced]
    return _part(model, nodes, inputs, outputs), boundary


def tail_boundary(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """The non-constant tensors ``nodes`` read but do not compute: graph inputs and activations
    of the rest of the network."""
    return sorted(_outer_reads(nodes) - _initializers(model))


def _outer_reads(nodes: list[onnx.NodeProto]) -> set[str]:
    produced = {name for node in nodes for name in node.output}
    return set().union(*(reads(node) for node in nodes)) - produced if nodes else set()


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def part_macs(nodes: list[onnx.NodeProto], macs: dict[str, float]) -> float:
    """MACs of ``nodes`` (``macs`` per node name, the nodes of their subgraphs counted too)."""
    total = 0.0
    for node in nodes:
        total += macs.get(node.name, 0.0)
        total += sum(macs.get(inner.name, 0.0) for sub in subgraphs_of(node) for inner in walk_nodes(sub))
    return total
