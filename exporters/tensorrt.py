"""Verified ONNX -> a TensorRT engine with the TensorRT 10 Python API.

The build parses the ONNX file, adds one optimization profile over the batch axis
(min/opt/max from `--batch-range`), and for FP16 enables FP16 kernels while the precision
plan (`precision.py`) pins normalisation, softmax, routers and kNN masks to FP32 with
`OBEY_PRECISION_CONSTRAINTS`. Tactic timings persist in a timing-cache file per GPU and
TensorRT version, so a rebuild is fast. The engine is written with its sidecar
(`mmdeploy.runtime.tensorrt.EngineSidecar`).

INT8 is TensorRT's explicit quantization: `build_int8_engine` writes the symmetric QDQ graph
(`qdq.py`), refuses it unless it is one TensorRT accepts, and builds it with INT8 and FP16
enabled: the quantized matmuls and convolutions run in INT8, everything else falls back to
FP16, and the same layers as in the FP16 plan are pinned to FP32. The sidecar's
`onnx_sha256` is then the QDQ graph's. An INT8 engine's parity is measured with the accuracy
gate (top-1 agreement and cosine against FP32), not max-abs: INT8 rounding moves every
logit, and what matters is whether the answers change.

TensorRT 11 removed weakly typed builds (the FP16/INT8 flags and layer precisions); its FP32
builds work as here, and FP16 and INT8 are refused on it with the reason.
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
from .qdq import QDQ_FILE, refuse_unless_symmetric, write_tensorrt_qdq

WORKSPACE_BYTES = 4 << 30


def timing_cache_path(gpu_name: str, tensorrt_version: str) -> Path:
    name = f"timing-{gpu_slug(gpu_name)}-{tensorrt_version}.cache"
    return default_cache_dir() / "tensorrt" / name


def build_engine(onnx_path: Path, out_dir: Path, profile: Profile, precision: str,
                 log: Callable[[str], None] = print,
                 question_profiles: tuple[Profile, ...] = ()) -> tuple[str, str, dict]:
    """Build `out_dir/model.<gpu>.<precision>.engine` and its sidecar from `onnx_path`;
    a vqa engine's one optimization profile also spans its question inputs
    (`question_profiles`: over batch and tokens).

    Returns (engine file name, sidecar file name, build facts for the manifest).
    """
    if precision == "int8":
        refuse_unless_symmetric(onnx_path)  # one clear line, not the parser's assertion
    _check_can_build(precision)
    import tensorrt as trt

    here = runtime_info()
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
    for each in (profile, *question_profiles):
        optimization.set_shape(each.input, each.min, each.opt, each.max)
    config.add_optimization_profile(optimization)
    pinned = set()
    if precision != "fp32":
        pinned = _apply_precision(trt, network, config, onnx_path, precision)

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
                            precision, sha256_file(onnx_path), len(pinned),
                            tuple(question_profiles))
    sidecar.save(out_dir / f"{name}.json")
    return name, f"{name}.json", {"build_seconds": round(seconds, 3), "fp32_layers": len(pinned),
                                  "timing_cache": str(cache_file)}


def _check_can_build(precision: str) -> None:
    """Refuse an unknown precision, a machine without TensorRT or a GPU, and FP16/INT8 on
    TensorRT 11 (which has no weakly typed builds)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if reason := unavailable_reason():
        raise BackendUnavailableError("tensorrt", reason)
    import tensorrt as trt

    if precision != "fp32" and int(trt.__version__.split(".")[0]) >= 11:
        raise ConfigError(f"TensorRT {trt.__version__} has no weakly typed {precision.upper()} "
                          f"builds; install tensorrt 10 for --{precision} "
                          "(pip install 'mm-peft-deploy[trt]')")


def build_int8_engine(fp32_onnx: Path, out_dir: Path, profile: Profile, reader,
                      log: Callable[[str], None] = print) -> tuple[str, str, dict]:
    """Build `out_dir/model.<gpu>.int8.engine` from the verified FP32 graph `fp32_onnx`.

    Writes the symmetric QDQ graph `out_dir/model.qdq.onnx`, calibrated on `reader` (an
    `onnxruntime.quantization.CalibrationDataReader` feeding `pixel_values`), then builds it
    with `build_engine`. Returns (engine file, sidecar file, build facts) like `build_engine`,
    with `details["qdq"]` describing the QDQ graph: publish `details["qdq"]["file"]` beside
    the engine (the sidecar's onnx_sha256 is its hash). Check its parity with the accuracy
    gate (top-1 agreement, cosine), not max-abs.
    """
    _check_can_build("int8")  # before calibrating, which takes a while
    qdq = write_tensorrt_qdq(fp32_onnx, out_dir / QDQ_FILE, reader)
    log(f"wrote {QDQ_FILE} in {qdq['quantize_seconds']:.1f} s: "
        f"{len(qdq['quantized_nodes'])} matmuls/convolutions INT8, "
        f"{len(qdq['not_quantized'])} left in float")
    engine, sidecar, details = build_engine(out_dir / QDQ_FILE, out_dir, profile, "int8", log)
    details["qdq"] = qdq
    return engine, sidecar, details


def _apply_precision(trt, network, config, onnx_path: Path, precision: str) -> set[str]:
    """Enable FP16 (and INT8 for Q/DQ graphs) and pin the plan's layers (precision and
    output types) to FP32."""
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
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
