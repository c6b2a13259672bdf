"""TensorRT: a serialized engine, its JSON sidecar, and the checks made before it runs.

An engine runs only on the TensorRT version and the GPU it was built for, and only for
input shapes inside its optimization profile. The sidecar written beside it records both;
loading compares them with the running TensorRT and GPU and refuses with
`EngineIncompatibleError` naming both sides, and every input is checked against the
profile (an `InputError` naming the input and its range) before the engine sees it.

Everything except `TensorRTPredictor` and `runtime_info` works without TensorRT or a GPU.
TensorRT itself is the optional extra `pip install 'mm-peft-deploy[trt]'`; device memory
and the stream come from torch's CUDA allocator.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_json, read_json
from ..errors import (
    ArtifactError,
    BackendUnavailableError,
    EngineIncompatibleError,
    InputError,
)
from ..interface import INPUT_NAME, QUESTION_INPUT_NAMES
from .base import Predictor

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the input's name and its min/opt/max shapes."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def for_batches(cls, batch_min: int, batch_opt: int, batch_max: int,
                    image_size: tuple[int, int], input_name: str = INPUT_NAME) -> Profile:
        """A profile over the batch axis of [batch, 3, H, W] pixels."""
        if not 1 <= batch_min <= batch_opt <= batch_max:
            raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got "
                             f"{batch_min}, {batch_opt}, {batch_max}")
        height, width = image_size
        return cls(input_name, (batch_min, 3, height, width), (batch_opt, 3, height, width),
                   (batch_max, 3, height, width))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a shape the engine was not built for, naming the input and its range."""
        shape = tuple(int(d) for d in shape)
        inside = (len(shape) == len(self.min)
                  and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max,
                                                              strict=True)))
        if name != self.input or not inside:
            raise InputError(f"input {name!r} has shape {list(shape)}; the engine's profile "
                             f"takes {self.input!r} from {list(self.min)} to {list(self.max)}")

    def to_dict(self) -> dict:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(data["input"], tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def question_profiles(batch_min: int, batch_opt: int, batch_max: int,
                      image_size: tuple[int, int], tokens_opt: int,
                      tokens_max: int) -> tuple[Profile, ...]:
    """One optimization profile over both axes of a vqa engine's three inputs: pixels over
    the batch; input_ids and attention_mask [batch, tokens] over the batch and from 1 token
    up to the tokenizer's limit, OPT at a typical question's length."""
    if not 1 <= tokens_opt <= tokens_max:
        raise ValueError(f"tokens must satisfy 1 <= opt <= max, got {tokens_opt}, {tokens_max}")
    pixels = Profile.for_batches(batch_min, batch_opt, batch_max, image_size)
    return (pixels, *(Profile(name, (batch_min, 1), (batch_opt, tokens_opt),
                              (batch_max, tokens_max)) for name in QUESTION_INPUT_NAMES))


def check_inputs(profiles: Sequence[Profile], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse inputs an engine built with `profiles` cannot take, naming the input: one
    missing or unknown, one outside its range, or a batch (or a question's tokens) that
    differs between the inputs."""
    by_name = {p.input: p for p in profiles}
    if set(shapes) != set(by_name):
        raise InputError(f"inputs {', '.join(map(repr, shapes))}; the engine takes "
                         f"{', '.join(map(repr, by_name))}")
    for name, shape in shapes.items():
        by_name[name].check(name, shape)
    batches = {int(shape[0]) for shape in shapes.values()}
    if len(batches) > 1:
        raise InputError(f"the inputs have different batch sizes ({sorted(batches)})")
    tokens = {int(shapes[n][1]) for n in QUESTION_INPUT_NAMES if n in shapes}
    if len(tokens) > 1:
        raise InputError(f"input_ids and attention_mask have different lengths "
                         f"({sorted(tokens)})")


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine is tied to: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineSidecar:
    """`model.<gpu>.<precision>.engine.json`: what the engine was built from and for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: Profile
    precision: str
    onnx_sha256: str
    fp32_layers: int = 0
    # a vqa engine's: input_ids' and attention_mask's, over batch and tokens
    question_profiles: tuple[Profile, ...] = ()

    @property
    def profiles(self) -> tuple[Profile, ...]:
        """Every input's profile, pixel_values first."""
        return (self.profile, *self.question_profiles)

    def save(self, path: Path) -> None:
        atomic_write_json(path, {**asdict(self), "profile": self.profile.to_dict(),
                                 "question_profiles": [p.to_dict()
                                                       for p in self.question_profiles]})

    @classmethod
    def load(cls, path: Path) -> EngineSidecar:
        data = read_json(path)
        try:
            return cls(**{**data, "profile": Profile.from_dict(data["profile"]),
                          "question_profiles": tuple(Profile.from_dict(p) for p in
                                                     data.get("question_profiles", []))})
        except (TypeError, KeyError) as exc:
            raise ArtifactError(f"{path}: not an engine sidecar ({exc})") from None

    def check_compatible(self, runtime: RuntimeInfo) -> None:
        """Raise EngineIncompatibleError for the first of TensorRT version, GPU name and
        compute capability that differs between the build and this machine."""
        for field in ("tensorrt_version", "gpu_name", "compute_capability"):
            built, here = getattr(self, field), getattr(runtime, field)
            if built != here:
                raise EngineIncompatibleError(field.replace("_", " "), built, here)


def gpu_slug(gpu_name: str) -> str:
    """A file-name-safe GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def engine_file(gpu_name: str, precision: str) -> str:
    return f"model.{gpu_slug(gpu_name)}.{precision}.engine"


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run on this machine, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'mm-peft-deploy[trt]'; needs a GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def runtime_info() -> RuntimeInfo:
    """The running TensorRT and GPU (device 0)."""
    import tensorrt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return RuntimeInfo(tensorrt.__version__, torch.cuda.get_device_name(0), f"{major}.{minor}")


class TensorRTEngine:
    """A deserialized engine on CUDA device 0: pixel_values (numpy; a vqa engine's also
    input_ids and attention_mask) in, outputs by name.

    The sidecar's profiles are checked before every run, so an out-of-range batch (or
    question length) is an InputError naming the input and its range rather than a
    TensorRT error.
    """

    def __init__(self, path: Path, sidecar: EngineSidecar):
        import tensorrt
        import torch

        self.path, self.profile, self.profiles = path, sidecar.profile, sidecar.profiles
        self._logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        self._runtime = tensorrt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path}: TensorRT could not deserialize it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names
                             if self.engine.get_tensor_mode(n) == tensorrt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        feeds = dict(zip((p.input for p in self.profiles), inputs, strict=True))
        check_inputs(self.profiles, {n: x.shape for n, x in feeds.items()})  # before TensorRT
        with torch.cuda.stream(self.stream):
            tensors = {n: torch.from_numpy(x).to("cuda", self._dtypes[n])
                       for n, x in feeds.items()}
            for name, tensor in tensors.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        self.stream.synchronize()
        return {name: t.float().cpu().numpy() for name, t in outputs.items()}


def load_engine(export_dir: Path, engine: str, sidecar: str) -> TensorRTEngine:
    """Check the sidecar against this machine, then load the engine."""
    recorded = EngineSidecar.load(export_dir / sidecar)
    if reason := unavailable_reason():
        raise BackendUnavailableError("tensorrt", reason)
    recorded.check_compatible(runtime_info())
    return TensorRTEngine(export_dir / engine, recorded)


class TensorRTPredictor(Predictor):
    """The run's engine (record "tensorrt"), checked against this GPU and TensorRT first."""

    backend = "tensorrt"

    def __init__(self, run_path: str | Path):
        super().__init__(run_path, "tensorrt")
        details = self.record.details
        self.engine = load_engine(self.run_dir.export_dir, details["engine"], details["sidecar"])
        self.device, self.precision = "cuda", self.record.precision

    def describe(self) -> str:
        return f"tensorrt ({runtime_info().gpu_name}, {self.precision})"

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.engine(pixel_values)

    def run_questions(self, pixel_values: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return self.engine(pixel_values, input_ids, attention_mask)


def _torch_dtype(trt_dtype):
    import tensorrt
    import torch

    return {tensorrt.float32: torch.float32, tensorrt.float16: torch.float16,
            tensorrt.int32: torch.int32, tensorrt.int64: torch.int64,
            tensorrt.bool: torch.bool}[trt_dtype]
