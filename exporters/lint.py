"""Op lint for TensorRT targets (DESIGN section 6).

TensorRT wants static control flow and shapes that follow from the input shapes. Flagged:
NonZero and other data-dependent-shape ops (Unique, NonMaxSuppression, Compress), control
flow (Loop, If, Scan), ScatterND/ScatterElements with a reduction, and TopK whose K is not
a constant. Every node is walked: the main graph, If/Loop/Scan bodies and local functions.
The lint reads the graph only, so models load without their external data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from mmdeploy.errors import ArtifactError, ConfigError

_ONNX_DOMAINS = ("", "ai.onnx")
_REASONS = {
    "NonZero": "data-dependent output shape",
    "Unique": "data-dependent output shape",
    "NonMaxSuppression": "data-dependent output shape",
    "Compress": "data-dependent output shape",
    "Loop": "control flow",
    "If": "control flow",
    "Scan": "control flow",
}
_SCATTERS = ("ScatterND", "ScatterElements")
TARGETS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Finding:
    """One node TensorRT would reject or run badly. `node_name` is a path through the
    enclosing nodes and functions, e.g. `function local.Body/loop_0` or `if_0/then_branch/nz`."""

    op_type: str
    node_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node_name!r}: {self.reason}"


def lint_onnx(model: onnx.ModelProto | str | Path) -> list[Finding]:
    if not isinstance(model, onnx.ModelProto):
        model = _load_graph_only(Path(model))
    findings = list(_lint_graph(model.graph, scope="", outer_constants=frozenset()))
    for function in model.functions:
        # A function's inputs are unknown until it is called: treat them as non-constant.
        constants = _constant_outputs(function.node)
        scope = f"function {function.domain}.{function.name}/"
        findings += _lint_nodes(function.node, scope, frozenset(constants))
    return findings


def check_for_target(findings: list[Finding], target: str) -> list[Finding]:
    """For "tensorrt", raise ConfigError summarising the findings (one line, counts per op);
    for "onnxruntime", return them for the caller to record as warnings."""
    if target not in TARGETS:
        raise ConfigError(f"unknown lint target {target!r} (known: {', '.join(TARGETS)})")
    if target == "tensorrt" and findings:
        counts = Counter(f.op_type for f in findings)
        summary = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
        raise ConfigError(
            f"graph is not TensorRT-friendly: {summary} (first: {findings[0]}); "
            "export the dense formulation or use another backend"
        )
    return findings


def _load_graph_only(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except DecodeError:
        raise ArtifactError(f"{path}: not a valid ONNX model") from None


def _lint_graph(
    graph: onnx.GraphProto, scope: str, outer_constants: frozenset[str]
) -> Iterator[Finding]:
    """Lint a graph whose nodes can also see `outer_constants` from enclosing graphs."""
    inputs = {i.name for i in graph.input}
    initializers = {t.name for t in graph.initializer}
    initializers |= {t.values.name for t in graph.sparse_initializer}
    # An initializer that is also a graph input can be overridden at run time (IR < 4).
    constants = (outer_constants - inputs) | (initializers - inputs)
    constants |= _constant_outputs(graph.node)
    yield from _lint_nodes(graph.node, scope, frozenset(constants))


def _lint_nodes(
    nodes: Iterable[onnx.NodeProto], scope: str, constants: frozenset[str]
) -> Iterator[Finding]:
    for index, node in enumerate(nodes):
        name = f"{scope}{node.name or f'{node.op_type}#{index}'}"
        if node.domain in _ONNX_DOMAINS:
            reason = _problem(node, constants)
            if reason:
                yield Finding(node.op_type, name, reason)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
            for subgraph in subgraphs:
                yield from _lint_graph(subgraph, f"{name}/{attr.name}/", constants)


def _problem(node: onnx.NodeProto, constants: frozenset[str]) -> str | None:
    if node.op_type in _REASONS:
        return _REASONS[node.op_type]
    if node.op_type in _SCATTERS:
        reduction = _string_attribute(node, "reduction", default="none")
        return None if reduction == "none" else f"scatter with reduction={reduction!r}"
    if node.op_type == "TopK" and len(node.input) > 1:  # TopK-1 has K as an attribute
        k = node.input[1]
        return None if k in constants else f"K comes from {k!r}, not a constant"
    return None


def _constant_outputs(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    return {
        out
        for node in nodes
        if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS
        for out in node.output
    }


def _string_attribute(node: onnx.NodeProto, name: str, default: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr).decode("utf-8")
    return default
