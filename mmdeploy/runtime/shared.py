"""Serving a shared export (`mmdeploy export --shared RUN1 RUN2 ... --out DIR`, DESIGN
section 11): one trunk engine for the backbone, a branch engine per run.

`SharedPredictor.predict_pixels(pixels, adapters)` takes the adapter of each image (a
server's batch of requests), `predict_requests(pixels, [(image, adapter), ...])` any number
of adapters per image (batch inference over several runs): either way the trunk runs once
over the images, then each branch over the trunk features of its own requests, and the
outputs come back in request order. Every file is checked against its sha256 before it
is loaded, as for a run's own export. On ONNX Runtime the branch sessions hold the frozen
blocks they all carry once (`WeightPool`), so an adapter adds its own weights and little
else to the server's memory.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts import ExportRecord, Manifest, RunDir
from ..errors import ArtifactError, BackendUnavailableError, ConfigError, InputError
from ..images import Preprocessor
from ..runs import RunConfig, load_run_config
from .base import check_shape, in_chunks, softmax
from .memory import release_freed_memory

MANIFEST_FILE = "manifest.json"
FORMATS = {"onnxruntime": "onnx", "aoti": "aoti"}  # backend -> the format it serves
"""The backends a shared export is served on, in the order one is chosen when none is
asked for, and the format of the files each one serves."""


def trunk_name(fmt: str) -> str:
    """The manifest name of the trunk in format `fmt`."""
    return f"{fmt}:trunk"


def branch_name(fmt: str, run: str) -> str:
    """The manifest name of run `run`'s branch in format `fmt`."""
    return f"{fmt}:branch:{run}"


Engine = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Branch:
    """One run's branch: its name in DIR (the run folder's name), the run it was exported
    from, its adapter and class names (read from that run), its loaded engine and its
    record's parity check through the trunk (`ParityReport.to_dict()`)."""

    name: str
    run_path: Path
    adapter: str
    class_names: list[str]
    engine: Engine
    check: dict


class SharedPredictor:
    """The trunk and branches of a shared export DIR on one backend ("onnxruntime" or
    "aoti"; None: the first of them DIR has), for the runs named in `runs` (None: all).

    Preprocessing is the backbone's, one for every branch: the runs share a backbone
    identity, and a run whose preprocessing or weights changed since the export is refused
    (export --shared again).
    """

    def __init__(self, shared_dir: str | Path, backend: str | None = None,
                 runs: Sequence[str] | None = None, threads: int | None = None):
        self.dir = Path(shared_dir)
        manifest = _load_manifest(self.dir)
        self.backend = backend or _first_backend(manifest, self.dir)
        if self.backend not in FORMATS:
            raise ConfigError(f"a shared export is served on {', '.join(FORMATS)}, not "
                              f"{self.backend!r}")
        fmt = FORMATS[self.backend]
        trunk = self._verified(manifest, trunk_name(fmt))
        prefix = branch_name(fmt, "")
        present = [name[len(prefix):] for name in manifest.exports if name.startswith(prefix)]
        if unknown := [name for name in runs or () if name not in present]:
            raise ConfigError(f"{self.dir}: no {fmt} branch for run {unknown[0]!r} (it has "
                              f"{', '.join(present) or 'none'})")
        records = {name: self._verified(manifest, branch_name(fmt, name))
                   for name in runs or present}
        configs = {name: load_run_config(RunDir(record.details["run"]))
                   for name, record in records.items()}
        self.batch_range = trunk.batch_limits
        self.precision = "fp32"
        self._trunk_record, self._threads = trunk, threads
        self._weights = WeightPool()
        self.preprocessor = self._preprocessor(trunk, records, configs)
        self.trunk = self._load(trunk, threads)
        self.device = trunk.device if self.backend == "aoti" else (
            "cuda" if self.trunk.on_gpu else "cpu")
        self.branches = {name: self._branch(name, record, configs[name])
                         for name, record in records.items()}
        self._changing = threading.Lock()

    def add_branch(self, name: str) -> Branch:
        """Load branch `name` from DIR's manifest as it is now (a branch exported into DIR
        since this predictor loaded, e.g. by `exporters.shared.add_to_shared`), with the
        checks made at start; it serves from the next batch on."""
        manifest = _load_manifest(self.dir)
        if manifest.record(trunk_name(FORMATS[self.backend])) != self._trunk_record:
            raise ArtifactError(f"{self.dir.name}: the trunk changed since this server started")
        record = self._verified(manifest, branch_name(FORMATS[self.backend], name))
        config = load_run_config(RunDir(record.details["run"]))
        self._check_run(name, record, config)
        if config.preprocessing != self._preprocessing:
            raise ArtifactError(f"{name} preprocesses differently from the runs of this trunk")
        branch = self._branch(name, record, config)
        with self._changing:  # a new dict: a batch in progress keeps the one it started with
            self.branches = {**self.branches, name: branch}
        return branch

    def remove_branch(self, name: str) -> None:
        """Stop serving branch `name` (batches in progress finish with it); DIR keeps it."""
        with self._changing:
            if name not in self.branches:
                raise InputError(f"no branch for adapter {name!r}")
            self.branches = {key: b for key, b in self.branches.items() if key != name}

    @property
    def runs(self) -> list[str]:
        return list(self.branches)

    def describe(self) -> str:
        return f"{self.backend} (shared trunk, {len(self.branches)} branches)"

    def predict(self, images: list[Image.Image],
                adapters: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """Class probabilities (each row over its own run's classes) and top-1 label indices
        for decoded RGB images, image i by branch `adapters[i]`."""
        return self.predict_pixels(self.preprocessor(images), adapters)

    def predict_pixels(self, pixel_values: np.ndarray,
                       adapters: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
        """`predict` on pixels already preprocessed."""
        return self.predict_requests(pixel_values, list(enumerate(adapters)))

    def predict_requests(self, pixel_values: np.ndarray, requests: Sequence[tuple[int, str]]
                         ) -> tuple[list[np.ndarray], list[int]]:
        """Probabilities and top-1 label per request (image index, adapter): an image may be
        asked of several branches, and goes through the trunk once."""
        probs = [softmax(row) for row in self.logits(pixel_values, requests)]
        return probs, [int(p.argmax()) for p in probs]

    def logits(self, pixel_values: np.ndarray,
               requests: Sequence[tuple[int, str]]) -> list[np.ndarray]:
        """Logits per request (image index, adapter), in request order: the trunk once over
        the batch, then each branch over the features of its own requests (both in chunks
        of the export's batch range)."""
        pixel_values = check_shape(pixel_values, self.preprocessor.image_size)
        if any(not 0 <= image < len(pixel_values) for image, _ in requests):
            raise InputError(f"a request names an image outside the batch of "
                             f"{len(pixel_values)}")
        branches = self.branches  # the set of branches this batch sees, whatever is added
        adapters = list(dict.fromkeys(adapter for _, adapter in requests))
        if unknown := [a for a in adapters if a not in branches]:
            raise InputError(f"no branch for adapter {unknown[0]!r} in {self.dir} (it has "
                             f"{', '.join(branches)})")
        features = in_chunks(lambda chunk: _only_output(self.trunk(chunk)), pixel_values,
                             self.batch_range)
        rows: list[np.ndarray | None] = [None] * len(requests)
        for name in adapters:
            mine = [k for k, (_, adapter) in enumerate(requests) if adapter == name]
            engine = branches[name].engine
            logits = in_chunks(lambda chunk, run=engine: run(chunk)["logits"],
                               features[[requests[k][0] for k in mine]], self.batch_range)
            for k, row in zip(mine, logits, strict=True):
                rows[k] = row
        return rows

    def _verified(self, manifest: Manifest, name: str) -> ExportRecord:
        """Record `name` once it passed its check and its files match their sha256."""
        record = manifest.record(name)
        if record is None:
            raise ArtifactError(f"{self.dir}: no verified {name} in its manifest")
        record.verify_files(self.dir)
        return record

    def _preprocessor(self, trunk: ExportRecord, records: dict[str, ExportRecord],
                      configs: dict[str, RunConfig]) -> Preprocessor:
        """The backbone's preprocessing, after checking each run is still what was exported:
        the trunk's backbone, the branch's weights, one preprocessing for all."""
        for name, record in records.items():
            self._check_run(name, record, configs[name], trunk)
        preprocessing = [run.preprocessing for run in configs.values()]
        if any(p != preprocessing[0] for p in preprocessing):
            raise ArtifactError(f"{self.dir}: the runs of one trunk preprocess differently; "
                                "run export --shared again")
        self._preprocessing = preprocessing[0]
        return Preprocessor.from_dict(preprocessing[0])

    def _check_run(self, name: str, record: ExportRecord, run: RunConfig,
                   trunk: ExportRecord | None = None) -> None:
        """The run of branch `name` is still what was exported: the trunk's backbone, the
        branch's weights."""
        trunk = trunk or self._trunk_record
        if (run.backbone_identity != trunk.details["backbone_identity"]
                or run.weights_sha256 != record.details["weights_sha256"]):
            raise ArtifactError(f"{record.details['run']} changed since {self.dir} was "
                                f"exported (branch {name}); run export --shared again")

    def _branch(self, name: str, record: ExportRecord, run: RunConfig) -> Branch:
        return Branch(name, Path(record.details["run"]), record.details["adapter"],
                      run.class_names, self._load(record, self._threads), record.check)

    def _load(self, record: ExportRecord, threads: int | None) -> Engine:
        path = self.dir / record.main_file
        if self.backend == "aoti":
            from .aoti import AotiPackage

            names = tuple(output["name"] for output in record.outputs)
            return AotiPackage(path, record.device, record.precision, names)
        from .onnxruntime import OnnxSession

        # No memory arena per session: the trunk and branches run one after another, and
        # each arena would keep the largest activations its session ever held (measured on
        # the ViT-B/16-sized bench: 8 branches, 3.1 GB peak with arenas, 1.6 GB without).
        # Each graph's parsed protobuf is freed once its session is built, but glibc would
        # keep it (`release_freed_memory`): trimmed after each, the load's peak is one graph.
        if record is self._trunk_record:
            session = OnnxSession(path, threads, arena=False, entries=NO_SPINNING)
        else:
            shared = self._weights.initializers(path)
            release_freed_memory()
            session = OnnxSession(path, threads, arena=False, entries=BRANCH_ENTRIES,
                                  initializers=shared)
        release_freed_memory()
        return session


NO_SPINNING = {"session.intra_op.allow_spinning": "0"}
"""The trunk and branch sessions run one after another, each with its own thread pool:
threads left spinning after one session's call would take the cores from the next one."""
BRANCH_ENTRIES = {**NO_SPINNING, "session.disable_prepacking": "1"}
"""Branch sessions read their large weights from a `WeightPool`; with prepacking on,
ONNX Runtime would pack a private copy of every shared matrix in every session."""


class WeightPool:
    """One buffer per distinct large weight among the branch graphs, shared by their
    ONNX Runtime sessions.

    Every branch carries the tower's blocks from the trunk's cut on (HMMoE adapts them,
    adapters on pooled features run them frozen): the same frozen weights in every branch
    file. Keyed by content (dtype, shape, sha256 of the bytes), equal weights are one buffer
    whatever their names in each graph; this is exact, a session reads the values its own
    copy holds. A buffer lives as long as a session holding it (the pool keeps weak
    references), so removing a branch frees what only it used.
    """

    MIN_BYTES = 1 << 16  # smaller weights (norms, biases) are not worth a hash

    def __init__(self) -> None:
        self._buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def initializers(self, path: Path) -> list[tuple[str, object]]:
        """(name, OrtValue) for each large weight of graph `path`, from the pool."""
        import onnx
        from onnx import numpy_helper

        from .onnxruntime import onnxruntime_required

        with onnxruntime_required():
            from onnxruntime import OrtValue

        try:
            graph = onnx.load(str(path)).graph
        except Exception as exc:  # protobuf's own errors for a damaged file
            raise ArtifactError(f"{path}: not a readable ONNX graph ({exc})") from None
        pairs = []
        with self._lock:
            for tensor in graph.initializer:
                raw = tensor.raw_data  # a copy of the bytes at each access
                if len(raw) < self.MIN_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                value = self._buffers.get(key)
                if value is None:
                    value = OrtValue.ortvalue_from_numpy(numpy_helper.to_array(tensor))
                    self._buffers[key] = value
                pairs.append((tensor.name, value))
        return pairs

    def __len__(self) -> int:
        return len(self._buffers)


def _load_manifest(shared_dir: Path) -> Manifest:
    path = shared_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{shared_dir}: no shared export (run `mmdeploy export --shared "
                            f"RUN1 RUN2 ... --out {shared_dir}`)")
    return Manifest.load(path)


def _first_backend(manifest: Manifest, shared_dir: Path) -> str:
    for backend, fmt in FORMATS.items():
        if manifest.record(trunk_name(fmt)) is not None:
            return backend
    raise BackendUnavailableError("onnxruntime", f"{shared_dir} has no verified trunk")


def _only_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    (features,) = outputs.values()
    return features
