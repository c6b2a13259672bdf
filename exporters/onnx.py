"""Deploy form (or any one-input module) -> ONNX with the dynamo exporter, opset 18, a named
dynamic batch axis."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from mmdeploy.artifacts import atomic_output
from mmdeploy.errors import MmdeployError
from mmdeploy.interface import INPUT_NAME, OUTPUT_NAMES

# Above this the protobuf's 2 GB limit is near: weights go to `model.onnx.data`.
EXTERNAL_DATA_BYTES = 1 << 30


def export_onnx(model: nn.Module, path: Path, image_size: tuple[int, int], batch_min: int,
                batch_max: int, opset: int) -> dict:
    """Export `model` (pixel_values -> logits, embeddings) and check the file.

    The sample batch is 2 (not 1) because torch.export specialises a dimension of size 1.
    """
    sample = torch.randn(max(2, batch_min), 3, *image_size)
    return export_graph(model, path, sample, INPUT_NAME, OUTPUT_NAMES, batch_min, batch_max,
                        opset)


def export_graph(model: nn.Module, path: Path, sample: torch.Tensor, input_name: str,
                 output_names: tuple[str, ...], batch_min: int, batch_max: int,
                 opset: int) -> dict:
    """Export `model` (one input, batch first, as `sample`; a batch of at least 2) with a
    dynamic batch axis named "batch", check the file and slim it: `export_onnx` for any
    interface (a shared trunk's or branch's, `shared.py`)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
    with quiet_exporter():
        torch.onnx.export(
            model, (sample,), str(path), dynamo=True, opset_version=opset,
            input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=({0: batch},),  # by position: the forward names its argument
            external_data=weight_bytes > EXTERNAL_DATA_BYTES, verbose=False)
    seconds = time.perf_counter() - started
    onnx.checker.check_model(str(path), full_check=True)
    _check_dynamic_batch(onnx.load(str(path), load_external_data=False).graph)
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
            yield
    finally:
        registration.setLevel(level)


def _check_dynamic_batch(graph: onnx.GraphProto) -> None:
    """When the model pins the batch size (`len(tensor)`, `.item()`, a Python loop over the
    batch), the dynamo exporter falls back to a fixed-shape graph with no error: say so."""
    for value in graph.input:
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            raise MmdeployError(
                f"the exported graph's input {value.name!r} has a fixed batch of "
                f"{batch.dim_value}: the deploy form pins the batch size (len() of a tensor, "
                ".item(), or a Python loop over the batch); use tensor.shape[0] instead")


def _describe(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
        tensor.elem_type).name, "shape": shape}
