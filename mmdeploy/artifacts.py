"""Run directory format, atomic writes and the export manifest (DESIGN section 8).

Only safetensors and JSON are ever read back: nothing is unpickled. Every file is written
to a temporary name beside its final path, fsynced and renamed over it, so a crash leaves
either the old file or the new one, never half of one. Every loader says which file is
wrong and how, in one line (`ArtifactError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from .config import ConfigBase
from .errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike[str]

_CHUNK = 1 << 20
_LFS_MAGIC = b"version https://git-lfs"
_RUN_ENTRIES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_bank.safetensors",
     "metrics.jsonl", "checkpoint", "export"}
)


# ---------------------------------------------------------------------------- atomic writes


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (engines and ONNX data can be GBs)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    return digest.hexdigest()


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit fsync it and rename it over `path`.

    For writers that insist on a file name of their own (`onnx.save`, AOTInductor packaging).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON (line {exc.lineno})") from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some filesystems can't fsync a directory: skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- safetensors
# torch is imported where tensors are saved or loaded, not with the module: reading
# manifests and checking hashes (batch inference's decode workers, Ray's tasks) needs none.


def save_safetensors(
    path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically. Each tensor is copied to its own contiguous CPU storage,
    so views and tensors sharing memory save as plain independent arrays."""
    import safetensors.torch

    standalone = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(standalone, metadata=metadata))


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    import safetensors.torch

    _read_safetensors_header(path)
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path}: corrupt safetensors file ({exc})") from None


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The file's `__metadata__` (string to string), read from the header alone."""
    return dict(_read_safetensors_header(path).get("__metadata__") or {})


def _read_safetensors_header(path: PathLike) -> dict[str, Any]:
    """Check a safetensors file's framing before the library sees it and return its header.

    The library reports a Git LFS pointer, a truncated file or a garbage header as an
    opaque `HeaderTooLarge` / `MetadataIncompleteBuffer`; these checks name the problem.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(len(_LFS_MAGIC))
            if size == 0:
                raise ArtifactError(f"{path}: empty file (0 bytes)")
            if prefix == _LFS_MAGIC:
                raise ArtifactError(
                    f"{path}: is a Git LFS pointer, not the weights; run git lfs pull"
                )
            if size < 8:
                raise ArtifactError(
                    f"{path}: truncated or corrupt safetensors file ({size} bytes, "
                    "shorter than the 8-byte header length)"
                )
            (header_len,) = struct.unpack("<Q", prefix[:8])
            if header_len > size - 8:
                raise ArtifactError(
                    f"{path}: truncated or corrupt safetensors file "
                    f"(header says {header_len} bytes, file has {size})"
                )
            f.seek(8)
            raw = f.read(header_len)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not a safetensors file") from None
    header = _parse_header(path, raw)
    _check_data_length(path, header, size - 8 - header_len)
    return header


def _parse_header(path: PathLike, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ArtifactError(
            f"{path}: truncated or corrupt safetensors file (header is not a JSON object)"
        )
    return header


def _check_data_length(path: PathLike, header: dict[str, Any], available: int) -> None:
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            needed = max(needed, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ArtifactError(
                f"{path}: corrupt safetensors file (tensor {name!r} has no valid data_offsets)"
            ) from None
    if needed > available:
        raise ArtifactError(
            f"{path}: truncated safetensors file "
            f"(tensor data needs {needed} bytes after the header, file has {available})"
        )


# ---------------------------------------------------------------------------- run directory


@dataclass
class RunDir:
    """A run directory: `runs/<name>/` with the layout of DESIGN section 8."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config_path(self) -> Path:
        return self.root / "adapter_config.json"

    @property
    def weights_path(self) -> Path:
        return self.root / "adapter_model.safetensors"

    @property
    def bank_path(self) -> Path:
        """The memory bank of adapters that keep one (GA-Net)."""
        return self.root / "adapter_bank.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def feature_cache_dir(self) -> Path:
        """Training's frozen-feature cache when it outgrows memory; removed after training."""
        return self.root / "feature-cache"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def manifest_path(self) -> Path:
        return self.export_dir / "manifest.json"

    def prepare_new(self, overwrite: bool) -> None:
        """Create the root for a fresh run.

        An existing non-empty root is refused unless `overwrite`; even then only a directory
        that looks like a run (an adapter_config.json, or nothing but run files) is deleted,
        so `--out ~ --overwrite` cannot wipe a home directory.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ArtifactError(f"{self.root} exists and is not a directory")
        if self.root.is_dir() and any(self.root.iterdir()):
            if not overwrite:
                raise ArtifactError(f"{self.root} already exists; pass --overwrite to replace it")
            if not self._looks_like_run():
                raise ArtifactError(
                    f"{self.root} is not a run directory (no adapter_config.json); "
                    "refusing to delete it with --overwrite"
                )
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def require(self) -> None:
        if not self.root.is_dir():
            raise ArtifactError(f"{self.root}: no such run directory")
        if not self.config_path.is_file():
            raise ArtifactError(f"{self.root} is not a run directory (no adapter_config.json)")

    def _looks_like_run(self) -> bool:
        names = [p.name for p in self.root.iterdir()]
        return self.config_path.is_file() or all(
            n in _RUN_ENTRIES or (n.startswith(".") and n.endswith(".tmp")) for n in names
        )


# ---------------------------------------------------------------------------- export manifest

MANIFEST_VERSION = 2
"""2: one typed record per export. mmdeploy 0.1.0 wrote version 1 (no `format_version`): one
`files` table, `parity` keyed by backend and a shared `extra["batch_range"]` that each
format overwrote, so which range belonged to which export was lost; those are refused.
A record's `timings` came later within version 2 and are optional: a record without them
loads with none."""


@dataclass
class RecordedTiming(ConfigBase):
    """How fast an export's backend ran, kept in its record: on which device ("cpu" or
    "cuda") and which model of it (the CPU's model string, the GPU's name: a timing made on
    another machine says nothing about this one), the median milliseconds of one call at
    `batch`, when (ISO 8601, UTC) and by what (`export --format auto` or `bench --record`).
    `pick_backend` serves the run on the fastest one timed on the device present."""

    device: str
    device_name: str
    batch: int
    median_ms: float
    measured_at: str
    source: str

    @property
    def ms_per_image(self) -> float:
        """What timings at different batches are compared by."""
        return self.median_ms / self.batch


@dataclass
class ExportRecord(ConfigBase):
    """One export of a run (`export/manifest.json`'s `exports[name]`): the files it is made
    of (a path relative to export/ -> {"sha256", "size"}, the main file first), the backend
    that serves it and at which precision, the graph's inputs and outputs ({"name", "dtype",
    "shape"}, "batch" for the dynamic axis), its own batch range ({"min", "opt", "max"}), the
    device it was compiled for (None: any), the check it passed (a parity or gate report's
    `to_dict()`, with "kind" and "passed"), the exporter versions, and the format's own
    facts (`details`: node counts, lint findings, build seconds, the TensorRT profile, ...);
    and how fast its backend ran on each device model it was timed on (`timings`, optional:
    records made before timings were kept have none).
    """

    backend: str
    precision: str
    batch_range: dict[str, int]
    check: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    opset: int | None = None
    device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    timings: list[RecordedTiming] = field(default_factory=list)

    @property
    def main_file(self) -> str:
        return next(iter(self.files))

    @property
    def passed(self) -> bool:
        return self.check.get("passed") is True

    @property
    def batch_limits(self) -> tuple[int, int]:
        """(smallest, largest) batch the export takes."""
        return self.batch_range["min"], self.batch_range["max"]

    def timing(self, device: str, device_name: str) -> RecordedTiming | None:
        """The timing made on `device` of model `device_name`, if any."""
        return next((t for t in self.timings
                     if (t.device, t.device_name) == (device, device_name)), None)

    def add_timing(self, timing: RecordedTiming) -> None:
        """Keep `timing`, replacing an earlier one made on the same device model."""
        self.timings = [t for t in self.timings
                        if (t.device, t.device_name) != (timing.device, timing.device_name)]
        self.timings.append(timing)

    def add_file(self, export_dir: PathLike, relpath: str) -> None:
        """Record (or refresh) the sha256 and size of `export_dir/relpath`."""
        path = Path(export_dir) / relpath
        self.files[Path(relpath).as_posix()] = {"sha256": sha256_file(path),
                                                "size": path.stat().st_size}

    def verify_files(self, export_dir: PathLike) -> None:
        """Check each of the export's files against its size and sha256; raises
        `ArtifactError` naming the first one that is missing, resized or altered."""
        for name, entry in self.files.items():
            path = Path(export_dir) / name
            if not path.is_file():
                raise ArtifactError(f"{path}: missing")
            size = path.stat().st_size
            if size != entry["size"]:
                raise ArtifactError(f"{path}: size {size}, manifest says {entry['size']}")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ArtifactError(f"{path}: sha256 mismatch (manifest {entry['sha256'][:8]}..., "
                                    f"file {digest[:8]}...)")


@dataclass
class Manifest(ConfigBase):
    """`export/manifest.json`: the run's exports by name ("onnx", "aoti", "tensorrt",
    "int8"), each an `ExportRecord`; and how the deploy form compared with the training
    form when they were made (`deploy_form_max_abs`, with the parity inputs' seed)."""

    format_version: int = MANIFEST_VERSION
    exports: dict[str, ExportRecord] = field(default_factory=dict)
    deploy_form_max_abs: float | None = None
    parity_seed: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or not isinstance(data.get("exports", {}), dict):
            raise ConfigError("Manifest expects a JSON object with an `exports` object")
        exports = {name: ExportRecord.from_dict(record)
                   for name, record in data.get("exports", {}).items()}
        return super().from_dict({**data, "exports": {}}).replace(exports=exports)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Every exported file, across the records."""
        return {name: entry for record in self.exports.values()
                for name, entry in record.files.items()}

    def record(self, name: str) -> ExportRecord | None:
        """The export `name` if the run has it and it passed its check, else None."""
        record = self.exports.get(name)
        return record if record is not None and record.passed else None

    def save(self, path: PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> Manifest:
        data = read_json(path)
        if isinstance(data, dict) and data.get("format_version") != MANIFEST_VERSION:
            written = data.get("format_version", "1 (mmdeploy 0.1.0)")
            raise ArtifactError(f"{path}: manifest format {written}, this mmdeploy reads "
                                f"{MANIFEST_VERSION}; re-export the run (`mmdeploy export "
                                "--run RUN --format ...`)")
        try:
            manifest = cls.from_dict(data)
        except ConfigError as exc:
            raise ArtifactError(f"{path}: {exc}") from None
        problem = manifest._shape_problem()
        if problem:
            raise ArtifactError(f"{path}: {problem}")
        return manifest

    def _shape_problem(self) -> str | None:
        """What is structurally wrong with a loaded manifest, if anything (JSON has no types)."""
        for name, record in self.exports.items():
            for key, kind in _RECORD_TYPES.items():
                if not isinstance(getattr(record, key), kind):
                    return f"export {name!r}: field {key!r} should be a {_JSON_NAMES[kind]}"
            for file, entry in record.files.items():
                if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                        and isinstance(entry.get("size"), int)):
                    return f"files entry {file!r} needs a sha256 string and an integer size"
            if not all(isinstance(record.batch_range.get(k), int) for k in ("min", "max")):
                return f"export {name!r}: batch_range needs integer min and max"
            for timing in record.timings:
                if not (isinstance(timing.batch, int) and timing.batch > 0
                        and isinstance(timing.median_ms, int | float)):
                    return f"export {name!r}: a timing needs a positive integer batch and a " \
                           "median_ms number"
        return None

    def verify_files(self, export_dir: PathLike) -> None:
        """Check every exported file against its size and sha256 (`ExportRecord.verify_files`)."""
        for record in self.exports.values():
            record.verify_files(export_dir)


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "backend": str, "precision": str, "batch_range": dict, "check": dict, "files": dict,
    "inputs": list, "outputs": list, "opset": (int, type(None)), "versions": dict,
    "details": dict, "timings": list,
}
_JSON_NAMES = {str: "string", dict: "JSON object", list: "JSON list",
               (int, type(None)): "integer or null"}


def installed_versions(distributions: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each distribution present (for manifests and results)."""
    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
