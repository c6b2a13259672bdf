"""Deploy form -> an AOTInductor package (`model.pt2`): a compiled engine torch alone runs.

`torch.export` traces the deploy form with a dynamic batch dimension over the export's
batch range, and `torch._inductor.aoti_compile_and_package` compiles it ahead of time with
the machine's C++ compiler (CPU) or Triton kernels (CUDA). Compiling takes seconds to
minutes (about 13 s for the tiny backbone on 2 CPU cores, 25 s for a ViT-B/16 tower).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from mmdeploy.errors import ConfigError
from mmdeploy.runtime.aoti import DTYPES

from .onnx import GraphInput, batch_input, dynamic_shapes, quiet_exporter


def fp16_problem(device: str) -> str | None:
    """Why AOTInductor cannot build an FP16 package on `device`, or None if it can.

    FP16 is built for CUDA only: most CPUs have no FP16 matrix units, so a CPU FP16 package
    would lose accuracy without gaining speed.
    """
    if device != "cuda":
        return "AOTInductor FP16 is built for CUDA only (this machine has no CUDA device); " \
               "export FP32 on CPU"
    return None


def compile_aoti(model: nn.Module, path: Path, image_size: tuple[int, int], batch_min: int,
                 batch_max: int, device: str, precision: str = "fp32") -> dict:
    """Export and compile `model` (pixel_values -> logits, embeddings) into a `.pt2` package.

    The sample batch is 2 because torch.export specialises a dimension of size 1.
    """
    sample = torch.randn(max(2, batch_min), 3, *image_size)
    return compile_program(model, path, sample, batch_min, batch_max, device, precision)


def compile_program(model: nn.Module, path: Path, sample: torch.Tensor, batch_min: int,
                    batch_max: int, device: str, precision: str = "fp32") -> dict:
    """`compile_aoti` for any one-input interface (`sample`: batch first, at least 2): a
    shared trunk's or branch's (`shared.py`)."""
    return compile_inputs(model, path, [batch_input("input", sample, batch_min, batch_max)],
                          device, precision)


def compile_inputs(model: nn.Module, path: Path, inputs: list[GraphInput], device: str,
                   precision: str = "fp32") -> dict:
    """`compile_aoti` for any interface: `inputs` in the forward's order with their named
    dynamic axes (a vqa run's pixels and question tokens, the token axis dynamic too).
    Floating-point inputs take the package's precision; token ids stay int64.

    The model is copied first: moving it to the device or to FP16 must not touch the
    caller's (the same deploy form is exported to other formats and checked against).
    """
    if precision not in DTYPES:
        raise ConfigError(f"unknown precision {precision!r} (known: {', '.join(DTYPES)})")
    if precision == "fp16" and (problem := fp16_problem(device)):
        raise ConfigError(problem)
    dtype = DTYPES[precision]
    module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    samples = tuple(i.sample.to(device=device, dtype=dtype) if i.sample.is_floating_point()
                    else i.sample.to(device) for i in inputs)
    batch = inputs[0].axes[0]
    started = time.perf_counter()
    with torch.no_grad(), quiet_exporter():
        # By position: the forward's arguments are pixel_values (and a question's tokens),
        # or a branch's trunk features.
        program = torch.export.export(module, samples, dynamic_shapes=dynamic_shapes(inputs))
    exported = time.perf_counter()
    # Written straight to `path`: the caller compiles into export/.staging/, which is what
    # makes publishing atomic (the packager insists on a name ending in .pt2).
    with quiet_exporter():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    compiled = time.perf_counter()
    return {
        "export_seconds": round(exported - started, 3),
        "compile_seconds": round(compiled - exported, 3),
        "device": device,
        "precision": precision,
        "batch_range": {"min": batch.min, "max": batch.max},
        "torch": torch.__version__,
    }
