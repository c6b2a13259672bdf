"""How close to the hardware a backend runs: this machine's matmul peak and a model's FLOPs.

Machines of one kind differ (an AMD Zen 5 one day, a Xeon with AMX the next), so absolute
speeds do not carry from one run to another; a share of the peak measured in the same run
does. The peak is what ONNX Runtime reaches on one large square matmul, a one-node graph
with a constant right-hand side (prepacked, as a model's weights are), on the provider and
thread count the bench's ONNX Runtime sessions use:
- FP32: `MatMul`, in GFLOP/s;
- INT8: `MatMulInteger` (UINT8 activations times INT8 weights, INT32 sums: what a dynamic
  INT8 graph runs), in GOP/s.

A model's work is counted from its exported FP32 graph at batch 1: 2*M*N*K for each MatMul
and Gemm (attention's score and value products included, as they are MatMul nodes) and
2 * output elements * input channels per group * kernel size for each Conv. Softmax,
normalisation, activations and other elementwise ops are not counted: they are a few
percent of a ViT's work and no matmul peak bounds them.

On a GPU (and for `benchmarks/gpu_check.py`), the peak is torch's own: `measure_torch_peak`
times `torch.matmul` of two large square matrices on the device, per precision (FP32 with
TF32 off, TF32, BF16, FP16), the way a model's compiled matmuls reach cuBLAS; and a model's
FLOPs can be counted without an ONNX graph by `torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mmdeploy.runtime.onnxruntime import CPU_PROVIDER, create_session

COUNTED_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class Peak:
    """ONNX Runtime's matmul throughput here for `size`-square matrices, median of `iters`
    runs: FP32 GFLOP/s, and INT8 GOP/s on the CPU provider (None on a GPU one, where
    MatMulInteger with UINT8 activations falls back to the CPU)."""

    provider: str
    device: str
    size: int
    iters: int
    fp32_gflops: float
    int8_gops: float | None

    def for_precision(self, precision: str) -> float | None:
        """The peak a row of `precision` is measured against (none for FP16)."""
        return {"fp32": self.fp32_gflops, "int8": self.int8_gops}.get(precision)


def matmul_graph(size: int, int8: bool, seed: int = 0) -> onnx.ModelProto:
    """One `size`-square MatMul (or MatMulInteger) with a constant right-hand side."""
    rng = np.random.default_rng(seed)
    if int8:
        weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
        op, a_type, y_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((size, size), dtype=np.float32)
        op, a_type, y_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", a_type, [size, size])],
        [helper.make_tensor_value_info("y", y_type, [size, size])],
        [numpy_helper.from_array(weight, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def measure_peak(size: int = 2048, iters: int = 5, threads: int | None = None) -> Peak:
    """Time FP32 MatMul and INT8 MatMulInteger on `size`-square matrices (one warm-up run,
    then the median of `iters`). Threads: ONNX Runtime's default unless `threads`, as for
    the bench's sessions."""
    rng = np.random.default_rng(1)
    ops = 2 * size**3
    with tempfile.TemporaryDirectory(prefix="mmdeploy-peak-") as tmp:
        fp32 = _session(matmul_graph(size, int8=False), Path(tmp) / "fp32.onnx", threads)
        provider = fp32.get_providers()[0]
        a = rng.standard_normal((size, size), dtype=np.float32)
        fp32_gflops = round(ops / _median_seconds(fp32, a, iters) / 1e9, 1)
        del fp32
        int8_gops = None
        if provider == CPU_PROVIDER:
            int8 = _session(matmul_graph(size, int8=True), Path(tmp) / "int8.onnx", threads)
            a = rng.integers(0, 256, (size, size), dtype=np.uint8)
            int8_gops = round(ops / _median_seconds(int8, a, iters) / 1e9, 1)
    device = "cpu" if provider == CPU_PROVIDER else "cuda"
    return Peak(provider, device, size, iters, fp32_gflops, int8_gops)


def _session(model: onnx.ModelProto, path: Path, threads: int | None):
    onnx.save(model, str(path))
    return create_session(path, threads)


def _median_seconds(session, a: np.ndarray, iters: int) -> float:
    session.run(None, {"a": a})  # warm-up: prepacking, allocation
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------------------- model FLOPs


@dataclass
class FlopCount:
    """FLOPs of one image through a graph's MatMul/Gemm/Conv nodes. `unresolved` names the
    counted-op nodes whose shapes shape inference could not fix (then `total` is a lower
    bound)."""

    total: int
    by_op: dict[str, int]
    unresolved: list[str] = field(default_factory=list)


def count_flops(path: Path) -> FlopCount:
    """Count the MatMul/Gemm/Conv FLOPs of the graph at `path` at batch 1."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1  # the batch axis
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                  for d in value.type.tensor_type.shape.dim]
    count = FlopCount(0, {op: 0 for op in COUNTED_OPS})
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        flops = _node_flops(node, [shapes.get(name) for name in node.input], shapes.get(
            node.output[0]))
        if flops is None:
            count.unresolved.append(node.name)
            continue
        count.by_op[node.op_type] += flops
        count.total += flops
    return count


def _node_flops(node: onnx.NodeProto, inputs: list, output: list | None) -> int | None:
    """2 * output elements * the length of each output element's dot product."""
    a, b = inputs[0], inputs[1]
    if not _known(output) or not _known(a) or not _known(b):
        return None
    if node.op_type == "MatMul":
        inner = a[-1]
    elif node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        inner = a[0] if trans_a else a[-1]
    else:  # Conv: weight [C_out, C_in / group, *kernel]
        inner = math.prod(b[1:])
    return 2 * math.prod(output) * inner


def _known(shape: list | None) -> bool:
    return shape is not None and len(shape) > 0 and all(d is not None and d > 0 for d in shape)


# ---------------------------------------------------------------------------- torch's peak

# precision -> the dtype of both operands; "tf32" is FP32 operands with TF32 matmuls allowed.
TORCH_PEAK_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                     "fp16": torch.float16}


@dataclass
class TorchPeak:
    """`torch.matmul` throughput of two `size`-square matrices on `device`, median of
    `iters` timed calls after a warm-up, in GFLOP/s by precision: "fp32" (TF32 off, torch's
    default), "tf32" (CUDA only), "bf16", "fp16". A row of a precision is measured against
    the peak of the same precision."""

    device: str
    size: int
    iters: int
    gflops: dict[str, float]

    def for_precision(self, precision: str) -> float | None:
        return self.gflops.get(precision)


def measure_torch_peak(device: str = "cuda", size: int = 8192, iters: int = 10,
                       precisions: tuple[str, ...] | None = None) -> TorchPeak:
    """Time `torch.matmul(a, b, out=c)` for each precision (default: all on CUDA; FP32, BF16
    and FP16 on CPU, where TF32 does not exist). CUDA is synchronized before the clock
    starts and after each call. torch's FP32 matmul precision is restored afterwards."""
    if precisions is None:
        precisions = tuple(p for p in TORCH_PEAK_DTYPES if device == "cuda" or p != "tf32")
    unknown = sorted(set(precisions) - set(TORCH_PEAK_DTYPES))
    if unknown:
        raise ValueError(f"unknown precision(s) {', '.join(unknown)}; known: "
                         f"{', '.join(TORCH_PEAK_DTYPES)}")
    if "tf32" in precisions and device != "cuda":
        raise ValueError("TF32 is a CUDA matmul mode; measure fp32 on the CPU")
    flops = 2 * size**3
    gflops = {}
    saved = torch.get_float32_matmul_precision()
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        for precision in precisions:
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            dtype = TORCH_PEAK_DTYPES[precision]
            a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator)
                    for _ in range(2))
            out = torch.empty(size, size, device=device, dtype=dtype)
            seconds = _median_matmul_seconds(a, b, out, iters, device)
            gflops[precision] = flops / seconds / 1e9  # unrounded: a small CPU check is < 0.1
            del a, b, out
    finally:
        torch.set_float32_matmul_precision(saved)
    return TorchPeak(device, size, iters, gflops)


def _median_matmul_seconds(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, iters: int,
                           device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: cuBLAS handles, heuristics, clocks
        torch.matmul(a, b, out=out)
    sync()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
