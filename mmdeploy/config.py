"""Dataclass configs for every stage, with a JSON round-trip.

Adapter configs live beside their adapter (`mmdeploy.models.<name>.config`) and use the same
`ConfigBase`; a run's `adapter_config.json` nests them all.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .data import Splits

T = TypeVar("T", bound="ConfigBase")


def _convert(tp: Any, value: Any) -> Any:
    """Coerce a JSON value to the annotated field type (nested configs, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        return tp.from_dict(value)
    if origin is tuple:
        return tuple(value)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v) for v in value]
    return value


@dataclass
class ConfigBase:
    """JSON round-trip for a dataclass: `from_dict(to_dict(c)) == c`, unknown keys refused."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
        kwargs = {k: _convert(hints[k], v) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


@dataclass
class BackboneConfig(ConfigBase):
    """Which frozen towers to load.

    `spec` is `tiny` (a seeded tiny CLIP built from a config and saved with
    `save_pretrained`), a local `CLIPModel` checkpoint directory, or `VISION_DIR,TEXT_DIR`.
    """

    spec: str = "tiny"
    tiny_seed: int = 0
    cache_dir: str | None = None  # where `tiny` is materialised; default ~/.cache/mm-peft-deploy


@dataclass
class DataConfig(ConfigBase):
    """Where the images come from and how they are split.

    `source` is `demo`, an image folder (one subfolder per class) or a CSV/JSONL manifest.
    `shots` = 0 means the full training pool; otherwise K images per class (few-shot).
    """

    source: str = "demo"
    shots: int = 16
    val_per_class: int = 20
    test_per_class: int = 50
    split_seed: int = 0
    prompt_template: str = "a photo of a {}."

    def splits(self) -> Splits:
        """The train/val/test split these settings draw from `source`: the same one for
        training, export, the accuracy gate and the app's examples."""
        from .data import load_labeled, make_splits  # numpy and PIL only once data is read

        return make_splits(load_labeled(self.source), self.shots, self.val_per_class,
                           self.test_per_class, self.split_seed)


@dataclass
class TrainConfig(ConfigBase):
    """How the adapter is trained; `ewc_lambda` None defers to the adapter's own default."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    ewc_lambda: float | None = None  # None: the adapter config's `ewc_lambda`, else 0 (off)
    max_nan_steps: int = 5
    # Run each image through the frozen part of the model once (trainers/frozen_cache.py);
    # a cache over `cache_memory_mb` is a memory-mapped file in the run.
    cache_features: bool = True
    cache_memory_mb: int = 4096
    # A folder where those features persist across runs (trainers/feature_store.py): runs on
    # the same images and backbone (seeds, adapters of a comparison) compute them once.
    feature_store: str | None = None


@dataclass
class ExportConfig(ConfigBase):
    # onnx, aoti, tensorrt, and triton (a Triton repository of the verified exports, written
    # to `triton_out`, default RUN/triton); none with `int8`: quantize the run's model.onnx.
    formats: tuple[str, ...] = ("onnx",)
    triton_out: str | None = None
    batch_min: int = 1
    batch_opt: int = 8
    batch_max: int = 32
    opset: int = 18
    target: str = "onnxruntime"  # `tensorrt` makes the op lint an error instead of a warning
    fp16: bool = False  # formats with an FP16 path build FP16 (tensorrt; aoti on CUDA)
    # INT8 (ONNX Runtime): also quantize model.onnx to model.int8.onnx, behind an accuracy gate.
    int8: str | None = None  # None, "dynamic" or "static"
    calib: int = 64  # training images to calibrate static ranges on (fewer if the split is)
    calib_method: str = "minmax"  # minmax, entropy or percentile
    calib_seed: int = 0
    int8_per_channel: bool | None = None  # None: static per channel, dynamic per tensor
    smooth: float | None = None  # SmoothQuant alpha (0..1); None: no smoothing
    int8_symmetric: bool = False  # static: S8 activations, zero points 0 (TensorRT's QDQ)
    fallback_order: str = "structural"  # or "measured" (exporters/int8.py)
    gate_agreement: float = 0.99  # least top-1 agreement with the FP32 model
    gate_drop: float = 1.0  # most accuracy lost on the validation split, in points
    serve_int8: bool = False  # infer and serve use the INT8 graph unless told --precision fp32

    def __post_init__(self) -> None:
        """Refuse INT8 settings that cannot work, before anything is loaded."""
        if self.int8 not in (None, "dynamic", "static"):
            raise ConfigError(f"--int8 {self.int8}: choose dynamic or static")
        if self.int8_symmetric and self.int8 != "static":
            raise ConfigError("--int8-symmetric quantizes activations from calibrated ranges: "
                              "use it with --int8 static")
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            raise ConfigError(f"--smooth {self.smooth}: alpha must be between 0 and 1")
        if self.smooth is not None and self.calib < 1:
            raise ConfigError(f"--calib {self.calib}: smoothing measures activations on at "
                              "least one training image")
        if self.int8 == "static" and self.calib < 1:
            raise ConfigError(f"--calib {self.calib}: static INT8 calibrates on at least one "
                              "training image (or use --int8 dynamic)")
        if self.calib_method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"--calib-method {self.calib_method}: choose minmax, entropy or "
                              "percentile")
        if not 0 <= self.gate_agreement <= 1 or not self.gate_drop >= 0:
            raise ConfigError("gate bounds: agreement must be within 0..1 and the drop >= 0")
        if self.serve_int8 and self.int8 is None:
            raise ConfigError("--serve-int8 needs --int8 (there is no INT8 graph to serve)")


def parse_overrides(config_cls: type[T], pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings from the command line -> typed values for `config_cls`.

    Tuples take comma-separated values; booleans take true/false.
    """
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            options = ", ".join(f.name for f in dataclasses.fields(config_cls))
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE with KEY one of {options}")
        values[key] = _parse_value(hints[key], raw.strip(), key)
    return values


def _parse_value(tp: Any, raw: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return tp(raw) if tp in (int, float, str) else json.loads(raw)
    except ValueError:
        kind = getattr(tp, "__name__", tp)
        raise ConfigError(f"--option {key}={raw!r}: not a valid {kind}") from None


def describe_options(config_cls: type) -> str:
    """One line per option with its default, for `--help`."""
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        lines.append(f"{f.name}={default}")
    return " ".join(lines)
