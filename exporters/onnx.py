"""Deploy form (or any module) -> ONNX with the dynamo exporter, opset 18, named dynamic
axes: the batch of every input, and for a vqa run's question inputs their token axis."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from mmdeploy.artifacts import atomic_output
from mmdeploy.errors import MmdeployError
from mmdeploy.interface import INPUT_NAME, OUTPUT_NAMES

# Above this the protobuf's 2 GB limit is near: weights go to `model.onnx.data`.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class Axis:
    """A named dynamic axis and its inclusive range ("batch", "tokens")."""

    name: str
    min: int
    max: int


@dataclass(frozen=True)
class GraphInput:
    """One input of an exported graph: its name, a sample tensor to trace with and its
    dynamic axes by position. An axis named alike in several inputs is one axis (the batch
    of pixels and tokens). A sample's dynamic sizes must be at least 2 and differ from each
    other's: torch.export specialises a size of 1 and may tie two equal ones."""

    name: str
    sample: torch.Tensor
    axes: dict[int, Axis] = field(default_factory=dict)


def batch_input(name: str, sample: torch.Tensor, batch_min: int,
                batch_max: int) -> GraphInput:
    """A batch-first input whose only dynamic axis is the batch."""
    return GraphInput(name, sample, {0: Axis("batch", batch_min, batch_max)})


def export_onnx(model: nn.Module, path: Path, image_size: tuple[int, int], batch_min: int,
                batch_max: int, opset: int) -> dict:
    """Export `model` (pixel_values -> logits, embeddings) and check the file.

    The sample batch is 2 (not 1) because torch.export specialises a dimension of size 1.
    """
    sample = torch.randn(max(2, batch_min), 3, *image_size)
    return export_graph(model, path, [batch_input(INPUT_NAME, sample, batch_min, batch_max)],
                        OUTPUT_NAMES, opset)


def dynamic_shapes(inputs: Sequence[GraphInput]) -> tuple[dict[int, torch.export.Dim], ...]:
    """torch.export's dynamic shapes for `inputs`, by position: one `Dim` per axis name."""
    dims: dict[str, torch.export.Dim] = {}
    for graph_input in inputs:
        for axis in graph_input.axes.values():
            dims.setdefault(axis.name, torch.export.Dim(axis.name, min=axis.min, max=axis.max))
    return tuple({position: dims[axis.name] for position, axis in graph_input.axes.items()}
                 for graph_input in inputs)


def export_graph(model: nn.Module, path: Path, inputs: Sequence[GraphInput],
                 output_names: tuple[str, ...], opset: int) -> dict:
    """Export `model` (its forward takes `inputs` in order) with their named dynamic axes,
    check the file and slim it: `export_onnx` for any interface (a shared trunk's or
    branch's, `shared.py`; a vqa run's pixels and question tokens)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    started = time.perf_counter()
    with quiet_exporter():
        torch.onnx.export(
            model, tuple(i.sample for i in inputs), str(path), dynamo=True,
            opset_version=opset, input_names=[i.name for i in inputs],
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes(inputs),  # by position: the forward names its own
            external_data=weight_bytes > EXTERNAL_DATA_BYTES, verbose=False)
    seconds = time.perf_counter() - started
    onnx.checker.check_model(str(path), full_check=True)
    _check_dynamic_axes(onnx.load(str(path), load_external_data=False).graph, inputs)
    nodes_exported = len(onnx.load(str(path), load_external_data=False).graph.node)
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        slim_onnx(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        "seconds": round(seconds, 3),
        "nodes_exported": nodes_exported,
        "nodes": len(graph.node),
        "inputs": [_describe(v) for v in graph.input],
        "outputs": [_describe(v) for v in graph.output],
    }


def slim_onnx(path: Path) -> None:
    """Fold constants and fuse patterns with onnxslim; keep the result only if it is smaller.

    The caller's parity check runs on whatever is left at `path`, so a slimming bug cannot
    reach a published export.
    """
    import onnxslim

    model = onnx.load(str(path))
    slimmed = onnxslim.slim(model)
    if len(slimmed.graph.node) < len(model.graph.node):
        onnx.checker.check_model(slimmed, full_check=True)
        with atomic_output(path) as temporary:
            onnx.save(slimmed, str(temporary))


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's notes about torchvision ops and torch-internal deprecations,
    which say nothing about the user's model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            # an axis named alike in several inputs (the batch of pixels and tokens) is one
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"# The axis name: \w+ will not be used")
            yield
    finally:
        registration.setLevel(level)


def _check_dynamic_axes(graph: onnx.GraphProto, inputs: Sequence[GraphInput]) -> None:
    """When the model pins a dynamic size (`len(tensor)`, `.item()`, a Python loop over the
    batch), the dynamo exporter falls back to a fixed-shape graph with no error: say so."""
    wanted = {i.name: i.axes for i in inputs}
    for value in graph.input:
        for position, axis in wanted.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[position]
            if dim.dim_param:
                continue
            if axis.name == "batch":
                raise MmdeployError(
                    f"the exported graph's input {value.name!r} has a fixed batch of "
                    f"{dim.dim_value}: the deploy form pins the batch size (len() of a tensor, "
                    ".item(), or a Python loop over the batch); use tensor.shape[0] instead")
            raise MmdeployError(
                f"the exported graph's input {value.name!r} has a fixed {axis.name} axis of "
                f"{dim.dim_value}: the deploy form pins its size (len() of a tensor, .item(), "
                "or a Python loop over it); use tensor.shape instead")


def _describe(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
        tensor.elem_type).name, "shape": shape}
