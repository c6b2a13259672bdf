"""The FP16 precision plan: which parts of the graph stay in FP32 (DESIGN section 6).

FP16 errors in CLIP-like models come mostly from normalisation overflowing (sums of squares
over hundreds of channels), from softmax's exponentials, and from decisions taken by a
comparison (a router's or a kNN graph's top-k mask flips when two scores round to the
same half). So the plan keeps in FP32:

- normalisation: LayerNormalization and the arithmetic of normalising by hand (reductions,
  square roots, powers, reciprocals, divisions), which also covers the embedding's L2
  normalisation and a graph adapter's degree normalisation;
- softmax (and the exponentials of a hand-written one);
- routers and kNN masks: every TopK, the chain that computes its scores back to (and
  including) the MatMul/Gemm that produced them, and the comparisons that turn the scores
  or the top-k values into a mask (`logits >= kth`, a kNN graph's `similarity > tau`).

It is a pure function of the ONNX graph (node names and op types), so it is tested without
TensorRT; `layers_to_pin` maps it onto the layer names TensorRT's ONNX parser gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx

NORMALISATION_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "LpNormalization",
    "Sqrt", "Pow", "Reciprocal", "Div",
})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Exp"})
SCORE_OPS = frozenset({"MatMul", "Gemm"})  # where a router's or kNN's scores are made
MASK_OPS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Where"})
# TensorRT layer types kept in FP32 whatever their name (the parser may fuse a node).
PINNED_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "TOPK"})
# Scores are traced back through ops that do not change which element is largest.
_PASS_THROUGH = frozenset({"Add", "Mul", "Sub", "Reshape", "Transpose", "Squeeze",
                           "Unsqueeze", "Cast", "Identity", "Flatten", "Concat", "Slice"})


def fp32_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: reason} for every node of the main graph the plan keeps in FP32."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan: dict[str, str] = {}
    for node in nodes:
        if node.op_type in NORMALISATION_OPS:
            plan[node.name] = "normalisation"
        elif node.op_type in SOFTMAX_OPS:
            plan[node.name] = "softmax"
    for node in nodes:
        if node.op_type != "TopK":
            continue
        plan[node.name] = "router/kNN top-k"
        scores = list(_score_chain(node, producer))
        for upstream in scores:
            plan.setdefault(upstream.name, "router/kNN scores")
        decided = [*node.output, *(out for n in scores for out in n.output)]
        for user in _mask_nodes(decided, consumers):
            plan.setdefault(user.name, "router/kNN mask")
    return plan


def _mask_nodes(tensors: list[str], consumers: dict[str, list[onnx.NodeProto]]):
    """Comparisons fed by `tensors` (TopK's outputs and its scores), directly or through
    reshapes and slices (the k-th value is `values[..., -1:]`; a kNN graph also compares
    the scores with a threshold)."""
    stack, seen = list(tensors), set()
    while stack:
        for user in consumers.get(stack.pop(), []):
            if user.name in seen:
                continue
            seen.add(user.name)
            if user.op_type in MASK_OPS:
                yield user
            elif user.op_type in _PASS_THROUGH:
                stack.extend(user.output)


def _score_chain(topk: onnx.NodeProto, producer: dict[str, onnx.NodeProto]):
    """Nodes from TopK's data input back to the nearest MatMul/Gemm on each path."""
    stack, seen = [topk.input[0]], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        yield node
        if node.op_type in _PASS_THROUGH:
            stack.extend(node.input)


def layers_to_pin(layers: Iterable[tuple[str, str]], plan: dict[str, str],
                  node_names: Iterable[str]) -> set[str]:
    """Names of the TensorRT layers to run in FP32.

    `layers` are (layer name, layer type name) pairs from the parsed network. TensorRT's ONNX
    parser names a node's main layer after the node and any helper layers `<node>_<n>`; a
    layer belongs to a node when its name, with such suffixes stripped, is the node's name.
    Layers of a type in PINNED_LAYER_TYPES are pinned whatever their name.
    """
    known = set(node_names)
    pinned = set()
    for name, layer_type in layers:
        if layer_type in PINNED_LAYER_TYPES or _owning_node(name, known) in plan:
            pinned.add(name)
    return pinned


def _owning_node(layer_name: str, node_names: set[str]) -> str | None:
    name = layer_name
    while name not in node_names:
        stripped = re.sub(r"_\d+$", "", name)
        if stripped == name:
            return None
        name = stripped
    return name
