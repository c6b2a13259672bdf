"""Where a quantized MatMul sits: the adapter's own, or which transformer block of the tower.

The INT8 fallback tries these first (`int8.quantize_gated`): quantization error is worst in
the first block (raw patch embeddings, the largest activation outliers), in the last block
(nothing left after it to average the error out before the head), and in the adapter's
matmuls (few, small, trained on a few shots, and on the path of every class decision); all
three are a small share of the MatMul work.

The exported graph names its nodes after ops, not modules (`node_MatMul_19`), so:
- the adapter's matmuls are the ones whose constant weight is one of the run's trained
  adapter tensors (`adapter_model.safetensors`), as stored or transposed, and those with a
  batched [1, K, N] constant weight (an adapter's product with its frozen context tokens:
  a ViT tower has none);
- the tower's blocks are cut after each MLP down-projection: the one MatMul of a block whose
  weight narrows (K > N: [4D, D]); MatMuls after the last one (a final projection) join the
  last block. A graph with no such MatMul has no blocks to name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class Structure:
    """The quantizable MatMuls, by role, each list in graph order."""

    adapter: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)  # the tower's, first to last

    def first_groups(self) -> list[tuple[str, list[str]]]:
        """(why, nodes) for the groups the fallback tries before any measured one: the
        adapter's matmuls, the first block, the last block (those that exist)."""
        groups = [("adapter", self.adapter)] if self.adapter else []
        if len(self.blocks) >= 2:
            groups += [("first block", self.blocks[0]), ("last block", self.blocks[-1])]
        return groups


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def adapter_digests(weights: Path | None) -> set[str]:
    """Digests of every 2-D tensor of an adapter weights file, as stored and transposed."""
    if weights is None or not weights.is_file():
        return set()
    from safetensors.numpy import load_file

    digests = set()
    for tensor in load_file(str(weights)).values():
        if tensor.ndim == 2:
            digests |= {_digest(tensor), _digest(tensor.T)}
    return digests


def structure(model: onnx.ModelProto, nodes: list[str], adapter_weights: Path | None
              ) -> Structure:
    """The roles of `nodes` (quantizable MatMul/Gemm nodes of `model`, in graph order)."""
    digests = adapter_digests(adapter_weights)
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    found = Structure()
    block: list[str] = []
    for name in nodes:
        weight = numpy_helper.to_array(inits[by_name[name].input[1]])
        if weight.ndim != 2 or _digest(weight) in digests:
            found.adapter.append(name)
            continue
        block.append(name)
        if _narrows(by_name[name], weight):
            found.blocks.append(block)
            block = []
    if block and found.blocks:
        found.blocks[-1] += block
    return found


def _narrows(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """K > N for this MatMul/Gemm (a Gemm's weight may be stored [N, K])."""
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    k, n = weight.shape[::-1] if trans_b else weight.shape
    return k > n
