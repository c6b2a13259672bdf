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

The INT8 plan (`int8_plan`) builds on it for TensorRT's explicit quantization: the
MatMul/Gemm/Conv nodes with a constant weight run in INT8 (Q/DQ on their inputs), the FP16
plan's nodes stay pinned to FP32, and everything else falls back to FP16. Kept out of INT8
besides the pinned nodes: matmuls of two activations (attention scores and their product
with the values: a few percent of the FLOPs, and softmax probabilities would use half of a
symmetric INT8 range) and the cosine head (the matmul that turns unit-length embeddings into
logits, where classes differ in the third decimal).

It is a pure function of the ONNX graph (node names and op types), so it is tested without
TensorRT; `layers_to_pin` maps it onto the layer names TensorRT's ONNX parser gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

NORMALISATION_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "LpNormalization",
    "Sqrt", "Pow", "Reciprocal", "Div",
})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Exp"})
SCORE_OPS = frozenset({"MatMul", "Gemm"})  # where a router's or kNN's scores are made
MASK_OPS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Where"})
TENSORRT_INT8_OPS = ("MatMul", "Gemm", "Conv")  # what TensorRT runs in INT8 between Q/DQ
# TensorRT layer types kept in FP32 whatever their name (the parser may fuse a node).
PINNED_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "TOPK"})
# Quantize/dequantize layers carry their own types: never pinned.
QDQ_LAYER_TYPES = frozenset({"QUANTIZE", "DEQUANTIZE"})
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
    Quantize/dequantize layers are never pinned (their types are the quantization itself).
    """
    known = set(node_names)
    pinned = set()
    for name, layer_type in layers:
        if layer_type in QDQ_LAYER_TYPES:
            continue
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


# ---------------------------------------------------------------------------- INT8 plan


@dataclass(frozen=True)
class Int8Plan:
    """Each node's precision in a TensorRT INT8 build (explicit quantization, FP16 fallback).

    `int8`: MatMul/Gemm/Conv nodes quantized (Q/DQ on their inputs), in graph order;
    `fp32`: {node: reason} pinned to FP32, the FP16 plan's nodes;
    `fp16`: every other node, in graph order;
    `not_quantized`: {node: reason} for the MatMul/Gemm/Conv nodes left in float.
    """

    int8: list[str]
    fp32: dict[str, str]
    fp16: list[str]
    not_quantized: dict[str, str]

    def precision(self, node: str) -> str:
        if node in self.fp32:
            return "fp32"
        return "int8" if node in self.int8 else "fp16"


def int8_plan(model: onnx.ModelProto) -> Int8Plan:
    """The INT8 plan of an FP32 graph (see the module docstring for what stays in float)."""
    nodes = list(model.graph.node)
    pinned = fp32_nodes(model)
    heads = head_nodes(model)
    constants = {i.name for i in model.graph.initializer}
    constants |= {out for n in nodes if n.op_type == "Constant" for out in n.output}
    int8, not_quantized = [], {}
    for node in nodes:
        if node.op_type not in TENSORRT_INT8_OPS:
            continue
        if node.name in pinned:
            not_quantized[node.name] = pinned[node.name]
        elif node.name in heads:
            not_quantized[node.name] = "cosine head"
        elif len(node.input) < 2 or node.input[1] not in constants:
            not_quantized[node.name] = "no constant weight (a product of two activations)"
        else:
            int8.append(node.name)
    quantized = set(int8)
    fp16 = [n.name for n in nodes if n.name not in pinned and n.name not in quantized]
    return Int8Plan(int8, pinned, fp16, not_quantized)


def head_nodes(model: onnx.ModelProto) -> set[str]:
    """The MatMul/Gemm nodes that make a graph output through pass-through ops only (the
    cosine head: normalised embeddings times the class features, then the logit scale)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    stack, seen, heads = [o.name for o in model.graph.output], set(), set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in SCORE_OPS:
            heads.add(node.name)
        elif node.op_type in _PASS_THROUGH:
            stack.extend(node.input)
    return heads
