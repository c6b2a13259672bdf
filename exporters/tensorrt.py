"""Verified ONNX -> a TensorRT engine with the TensorRT 10 Python API.

The build parses the ONNX file, adds one optimization profile over the batch axis
(min/opt/max from `--batch-range`), and for FP16 enables FP16 kernels while the precision
plan (`precision.py`) pins normalisation, softmax, routers and kNN masks to FP32 with
`OBEY_PRECISION_CONSTRAINTS`. Tactic timings persist in a timing-cache file per GPU and
TensorRT version, so a rebuild is fast. The engine is written with its sidecar
(`mmdeploy.runtime.tensorrt.EngineSidecar`).

TensorRT 11 removed weakly typed builds (the FP16 flag and layer precisions); its FP32
builds work as here, and FP16 is refused on it with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import onnx

from mmdeploy.artifacts import atomic_write_bytes, sha256_file
from mmdeploy.backbone import default_cache_dir
from mmdeploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from mmdeploy.runtime.tensorrt import (
    PRECISIONS,
    EngineSidecar,
    Profile,
    engine_file,
    gpu_slug,
    runtime_info,
    unavailable_reason,
)

from .precision import fp32_nodes, layers_to_pin

WORKSPACE_BYTES = 4 << 30


def timing_cache_path(gpu_name: str, tensorrt_version: str) -> Path:
    name = f"timing-{gpu_slug(gpu_name)}-{tensorrt_version}.cache"
    return default_cache_dir() / "tensorrt" / name


def build_engine(onnx_path: Path, out_dir: Path, profile: Profile, precision: str,
                 log: Callable[[str], None] = print) -> tuple[str, str, dict]:
    """Build `out_dir/model.<gpu>.<precision>.engine` and its sidecar from `onnx_path`.

    Returns (engine file name, sidecar file name, build facts for the manifest).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if reason := unavailable_reason():
        raise BackendUnavailableError("tensorrt", reason)
    import tensorrt as trt

    here = runtime_info()
    if precision == "fp16" and int(trt.__version__.split(".")[0]) >= 11:
        raise ConfigError(f"TensorRT {trt.__version__} has no weakly typed FP16 builds; "
                          "install tensorrt 10 for --fp16 (pip install 'mm-peft-deploy[trt]')")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT's ONNX parser refused it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    optimization = builder.create_optimization_profile()
    optimization.set_shape(profile.input, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization)
    pinned = _apply_precision(trt, network, config, onnx_path) if precision == "fp16" else set()

    cache_file = timing_cache_path(here.gpu_name, trt.__version__)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building the TensorRT {precision} engine (profile batch {profile.min[0]}.."
        f"{profile.max[0]}, {len(pinned)} layers pinned to FP32)")
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise ArtifactError(f"{onnx_path}: TensorRT could not build an engine (see its log)")
    atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))

    name = engine_file(here.gpu_name, precision)
    atomic_write_bytes(out_dir / name, bytes(serialized))
    sidecar = EngineSidecar(trt.__version__, here.gpu_name, here.compute_capability, profile,
                            precision, sha256_file(onnx_path), len(pinned))
    sidecar.save(out_dir / f"{name}.json")
    return name, f"{name}.json", {"build_seconds": round(seconds, 3), "fp32_layers": len(pinned),
                                  "timing_cache": str(cache_file)}


def _apply_precision(trt, network, config, onnx_path: Path) -> set[str]:
    """Enable FP16 and pin the plan's layers (precision and output types) to FP32."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    graph = onnx.load(str(onnx_path), load_external_data=False)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    pinned = layers_to_pin([(layer.name, layer.type.name) for layer in layers],
                           fp32_nodes(graph), [n.name for n in graph.graph.node])
    for layer in layers:
        if layer.name not in pinned:
            continue
        layer.precision = trt.float32
        for index in range(layer.num_outputs):
            if layer.get_output(index).dtype in (trt.float32, trt.float16):
                layer.set_output_type(index, trt.float32)
    return pinned
