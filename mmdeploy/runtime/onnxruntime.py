"""ONNX Runtime: the exported graph, on the CUDA provider when `onnxruntime-gpu` has one."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backbone import default_cache_dir
from ..errors import ArtifactError, BackendUnavailableError, ConfigError
from ..interface import INPUT_NAME, QUESTION_INPUT_NAMES
from .base import Predictor
from .records import SERVING_PRECISIONS
from .tensorrt import Profile, question_profiles

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # the quantized graph, published only when it passed its gate
INSTALL_HINT = "pip install 'mm-peft-deploy[cpu]', or '[gpu]' for CUDA"
# pip leaves an installed onnxruntime in place beside onnxruntime-gpu: both write one package
GPU_HINT = "pip install 'mm-peft-deploy[gpu]' where onnxruntime is not installed"


@contextmanager
def onnxruntime_required() -> Iterator[None]:
    """Wrap every import of onnxruntime: a failed one becomes one line naming the extra.

    ONNX Runtime comes from the `cpu` extra (onnxruntime) or the `gpu` one (onnxruntime-gpu),
    not from the base install: the two distributions write the same package.
    """
    try:
        yield
    except ImportError as exc:
        if importlib.util.find_spec("onnxruntime") is None:
            problem = "not installed"
        else:  # installed but broken, e.g. half removed along with the other distribution
            problem = f"installed but does not import ({str(exc).splitlines()[0]})"
        raise BackendUnavailableError("onnxruntime", f"{problem}; {INSTALL_HINT}") from None


def available_providers() -> list[str]:
    with onnxruntime_required():
        import onnxruntime
    return onnxruntime.get_available_providers()


# Fastest first. The TensorRT provider needs TensorRT's own libraries beside onnxruntime-gpu.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    """The execution providers to ask for, best first, and why better ones were left out."""

    providers: list[str]
    skipped: list[str]


def choose_providers(available: list[str], tensorrt_importable: bool) -> ProviderChoice:
    """Pick providers from `onnxruntime.get_available_providers()`.

    `onnxruntime-gpu` lists the TensorRT provider whether or not TensorRT's libraries are
    installed (onnxruntime would then fall back with an error in its log), so it is only
    asked for when `tensorrt` imports. CPU always comes last as the fallback.
    """
    providers, skipped = [], []
    for name in GPU_PROVIDERS:
        if name not in available:
            skipped.append(f"{name}: not in this onnxruntime ({GPU_HINT})")
        elif name == "TensorrtExecutionProvider" and not tensorrt_importable:
            skipped.append(f"{name}: TensorRT's libraries are not installed (pip install "
                           "'mm-peft-deploy[trt]')")
        else:
            providers.append(name)
    return ProviderChoice([*providers, CPU_PROVIDER], skipped)


def _tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def provider_options(name: str, profiles: Sequence[Profile] | None) -> dict:
    """TensorRT provider: cache engines across sessions and build one profile for the whole
    batch range (otherwise it rebuilds an engine for every new batch size), over every
    input (a vqa graph's question inputs over their tokens too): "name:1x3x32x32,...",
    one string each for min, opt and max."""
    if name != "TensorrtExecutionProvider":
        return {}
    options = {"trt_engine_cache_enable": "True",
               "trt_engine_cache_path": str(default_cache_dir() / "ort-tensorrt")}
    if profiles:
        for key in ("min", "opt", "max"):
            options[f"trt_profile_{key}_shapes"] = ",".join(
                f"{p.input}:{'x'.join(map(str, getattr(p, key)))}" for p in profiles)
    return options


def create_session(path: Path, threads: int | None = None,
                   profile: Sequence[Profile] | None = None, arena: bool = True,
                   initializers: Sequence[tuple[str, object]] = (),
                   entries: Mapping[str, str] | None = None):
    """An InferenceSession on the best provider present (TensorRT, CUDA, else CPU).

    `profile`: each input's (min, opt, max) shapes, for the TensorRT provider. `arena=False`:
    no CPU memory arena, so memory freed after a call goes back to the heap for the next
    session instead of staying in this session's arena (see `runtime.shared`).
    `initializers`: (name, OrtValue) pairs used instead of the graph's own initializers of
    those names (`SessionOptions.add_initializer`: the buffers are shared, not copied; they
    must outlive the session). `entries`: session config entries.
    """
    with onnxruntime_required():
        import onnxruntime

    choice = choose_providers(available_providers(), _tensorrt_importable())
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    for name, value in initializers:
        options.add_initializer(name, value)
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    providers = [(name, provider_options(name, profile)) for name in choice.providers]
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({first_line})") from None


class OnnxSession:
    """An exported graph in ONNX Runtime: its one input in (pixel_values; a shared trunk's
    features for a branch), or all its inputs by name (`run_feeds`), outputs by name.

    On a GPU provider the input is copied to the device once and the outputs are bound on
    the device (IO binding), so onnxruntime does not stage them through host buffers of
    its own; they are copied back to the host once, at the end.
    """

    def __init__(self, path: Path, threads: int | None = None,
                 profile: Sequence[Profile] | None = None, arena: bool = True,
                 initializers: Sequence[tuple[str, object]] = (),
                 entries: Mapping[str, str] | None = None):
        self.session = create_session(path, threads, profile, arena, initializers, entries)
        self._shared = list(initializers)  # their buffers live as long as this session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_name = self.input_names[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]

    @property
    def on_gpu(self) -> bool:
        return self.provider != CPU_PROVIDER

    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for the graph's inputs in its order (pixel_values; a vqa engine's also
        input_ids and attention_mask)."""
        return self.run_feeds(dict(zip(self.input_names, inputs, strict=True)))

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.on_gpu:
            outputs = self.session.run(self.output_names, feeds)
        else:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, outputs, strict=True))


class OnnxRuntimePredictor(Predictor):
    """The run's FP32 graph (record "onnx"), or with `precision="int8"` its INT8 graph
    (record "int8": `model.int8.onnx`, published only once it passed its accuracy gate)."""

    backend = "onnxruntime"

    def __init__(self, run_path: str | Path, threads: int | None = None,
                 precision: str = "fp32"):
        if precision not in SERVING_PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose from "
                              f"{', '.join(SERVING_PRECISIONS)}")
        super().__init__(run_path, "int8" if precision == "int8" else "onnx")
        self.session = OnnxSession(self.run_dir.export_dir / self.record.main_file, threads,
                                   self.profiles())
        self.device = "cuda" if self.session.on_gpu else "cpu"
        self.precision = precision

    def profiles(self) -> tuple[Profile, ...]:
        """The inputs' shapes for the TensorRT provider: the record's batch range, and a
        vqa graph's question lengths (1, a typical question's, the tokenizer's limit)."""
        low, high = self.batch_range
        opt = self.record.batch_range.get("opt", high)
        details = self.record.details
        if self.task == "vqa":
            return question_profiles(low, opt, high, self.preprocessor.image_size,
                                     details["typical_question_tokens"],
                                     details["max_question_tokens"])
        return (Profile.for_batches(low, opt, high, self.preprocessor.image_size),)

    def describe(self) -> str:
        return f"onnxruntime ({self.session.provider})"

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.session(pixel_values)

    def run_questions(self, pixel_values: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return self.session.run_feeds(dict(zip(
            (INPUT_NAME, *QUESTION_INPUT_NAMES), (pixel_values, input_ids, attention_mask),
            strict=True)))
