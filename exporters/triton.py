"""`export --format triton`: a Triton Inference Server model repository from a verified export.

    REPO/
      README.md                  the tritonserver command and how to call it
      client.py                  a tritonclient example using the toolkit's own preprocessing
      NAME/config.pbtxt          platform onnxruntime_onnx, dynamic batching, instance group
      NAME/labels.txt            class names, for Triton's classification extension
      NAME/mmdeploy.json         source run, task, batch range, preprocessing, sha256 of the
                                 model files
      NAME/tokenizer/            a vqa run's tokenizer, saved with its export: the client
                                 tokenizes each question with it (`QuestionTokenizer`)
      NAME/1/model.onnx (+ model.onnx.data)
      NAME_tensorrt/...          the same for a verified TensorRT engine (platform
                                 tensorrt_plan, 1/model.plan), when the run has one

Nothing is re-exported: the files are the run's verified ones, copied and re-hashed. The
config is built from the exported graph (names, dtypes and dims of every input and output)
and checked twice before the repository is published: parsed with Triton's own protobuf
schema (`tritonclient`'s `model_config_pb2`) and compared with the ONNX graph, because the
schema alone accepts a wrong platform, a wrong name or wrong dims. `validate_repository`
runs the same checks on a repository edited by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from mmdeploy.artifacts import (
    ExportRecord,
    Manifest,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)
from mmdeploy.errors import ArtifactError, ConfigError
from mmdeploy.questions import TOKENIZER_DIR
from mmdeploy.runs import load_run_config
from mmdeploy.runtime.onnxruntime import ONNX_FILE
from mmdeploy.runtime.tensorrt import EngineSidecar

EXTRA = "pip install 'mm-peft-deploy[triton]'"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
METADATA_FILE = "mmdeploy.json"
VERSION = "1"
# Triton's default model file name for each platform this toolkit writes.
PLATFORM_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
QUEUE_DELAY_US = 500  # how long Triton may hold a request to grow a batch
MAX_QUEUE = 64  # requests waiting per model before Triton refuses more

_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def model_config_pb2():
    """Triton's config schema; it ships in `tritonclient[grpc]` (the `triton` extra)."""
    try:
        from tritonclient.grpc import model_config_pb2 as schema
    except ImportError:
        raise ConfigError(f"a Triton model repository needs tritonclient[grpc]: {EXTRA}") from None
    return schema


@dataclass(frozen=True)
class Tensor:
    """One graph input or output as Triton sees it: dims without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class GraphInterface:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @classmethod
    def read(cls, path: Path) -> GraphInterface:
        """Names, dtypes and per-item dims of an ONNX graph whose first axis is the batch."""
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # onnx raises DecodeError and friends for a broken file
            raise ArtifactError(f"{path}: not a readable ONNX graph ({exc})") from None
        initializers = {i.name for i in graph.initializer}
        inputs = [v for v in graph.input if v.name not in initializers]
        return cls(tuple(_tensor(path, v) for v in inputs),
                   tuple(_tensor(path, v) for v in graph.output))


def _tensor(path: Path, value: onnx.ValueInfoProto) -> Tensor:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    if not dims or dims[0] != -1:
        raise ArtifactError(f"{path}: {value.name!r} has no dynamic batch axis (shape {dims}); "
                            "Triton's batching needs one")
    data_type = _DTYPES.get(tensor_type.elem_type)
    if data_type is None:
        raise ArtifactError(f"{path}: {value.name!r} has ONNX element type "
                            f"{tensor_type.elem_type}, which this writer does not map")
    return Tensor(value.name, data_type, tuple(dims[1:]))


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository: what to copy and how Triton should run it."""

    name: str
    platform: str
    files: dict[str, Path]  # name in the version folder -> verified source file
    batch_min: int
    batch_opt: int
    batch_max: int
    instance_kind: str  # KIND_AUTO (GPU when the server has one) or KIND_GPU
    source: str  # the run's export record the files come from ("onnx", "tensorrt")
    tokenizer: dict[str, Path] = field(default_factory=dict)  # a vqa run's: name -> file


def build_config(spec: ModelSpec, interface: GraphInterface):
    """The `ModelConfig` message for `spec`, from the graph's interface."""
    schema = model_config_pb2()
    config = schema.ModelConfig(name=spec.name, platform=spec.platform,
                                max_batch_size=spec.batch_max)
    for tensor in interface.inputs:
        config.input.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    for tensor in interface.outputs:
        output = config.output.add(name=tensor.name, data_type=tensor.data_type,
                                   dims=tensor.dims)
        if tensor.name == "logits":
            output.label_filename = LABELS_FILE
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(sorted({spec.batch_opt, spec.batch_max}))
    batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    batching.default_queue_policy.max_queue_size = MAX_QUEUE
    config.instance_group.add(count=1, kind=spec.instance_kind)
    return config


def parse_config(path: Path):
    """A `config.pbtxt` parsed with Triton's schema; a syntax or field error is one line."""
    from google.protobuf import text_format

    schema = model_config_pb2()
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), schema.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid Triton model config ({exc})") from None


def config_problems(config, interface: GraphInterface, batch_max: int) -> list[str]:
    """Where a parsed config disagrees with the graph it serves (empty when it matches)."""
    schema = model_config_pb2()
    type_name = schema.DataType.Name
    problems = []
    if config.platform not in PLATFORM_FILES:
        problems.append(f"platform {config.platform!r} is not one of "
                        f"{', '.join(PLATFORM_FILES)}")
    if not 1 <= config.max_batch_size <= batch_max:
        problems.append(f"max_batch_size {config.max_batch_size} is outside the export's "
                        f"batch range 1..{batch_max}")
    for kind, declared, actual in (("input", config.input, interface.inputs),
                                   ("output", config.output, interface.outputs)):
        graph = {t.name: t for t in actual}
        for entry in declared:
            tensor = graph.get(entry.name)
            if tensor is None:
                problems.append(f"{kind} {entry.name!r} is not in the graph (it has "
                                f"{', '.join(graph)})")
                continue
            if type_name(entry.data_type) != tensor.data_type:
                problems.append(f"{kind} {entry.name!r} is {type_name(entry.data_type)}, the "
                                f"graph's is {tensor.data_type}")
            if tuple(entry.dims) != tensor.dims:
                problems.append(f"{kind} {entry.name!r} has dims {list(entry.dims)}, the "
                                f"graph's are {list(tensor.dims)} (batch axis excluded)")
        missing = set(graph) - {entry.name for entry in declared}
        if kind == "input" and missing:
            problems.append(f"graph input(s) {', '.join(sorted(missing))} not declared")
    for size in config.dynamic_batching.preferred_batch_size:
        if size > config.max_batch_size:
            problems.append(f"preferred_batch_size {size} exceeds max_batch_size "
                            f"{config.max_batch_size}")
    if config.platform == "tensorrt_plan":
        kinds = {schema.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
        if kinds - {"KIND_GPU", "KIND_AUTO"}:
            problems.append("a TensorRT plan runs on GPU instances only")
    return problems


def validate_model(model_dir: Path) -> None:
    """Check one model folder: the config against Triton's schema and against its graph,
    and every file against the sha256 recorded when the repository was written."""
    metadata = read_json(model_dir / METADATA_FILE)
    for relpath, digest in metadata["files"].items():
        path = model_dir / relpath
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: sha256 differs from {model_dir / METADATA_FILE}")
    config_path = model_dir / CONFIG_FILE
    config = parse_config(config_path)
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"{config_path}: name {config.name!r} differs from its folder "
                          f"{model_dir.name!r} (Triton refuses to load it)")
    expected = PLATFORM_FILES.get(config.platform)
    if expected and not (model_dir / VERSION / expected).is_file():
        raise ConfigError(f"{config_path}: platform {config.platform!r} loads "
                          f"{VERSION}/{expected}, which is not in the repository")
    # A plan cannot be read without TensorRT: it is checked against the graph it was built from.
    interface = GraphInterface.read(model_dir / metadata["graph"])
    problems = config_problems(config, interface, metadata["batch_range"]["max"])
    if problems:
        raise ConfigError(f"{config_path} does not match the exported graph: "
                          f"{'; '.join(problems)}")


def validate_repository(repository: str | Path) -> list[str]:
    """Validate every model folder of a repository written by `write_repository`; returns
    their names."""
    root = Path(repository)
    models = sorted(p.name for p in root.iterdir() if (p / METADATA_FILE).is_file()) \
        if root.is_dir() else []
    if not models:
        raise ArtifactError(f"{root}: no model folder written by `mmdeploy export --format "
                            "triton` (each has a config.pbtxt and a mmdeploy.json)")
    for name in models:
        validate_model(root / name)
    return models


def repository_name(run_dir: RunDir) -> str:
    """The run folder's name in the characters Triton allows in a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.root.resolve().name) or "model"


def plan_models(run_dir: RunDir, manifest: Manifest, name: str) -> list[ModelSpec]:
    """The ONNX model, and the TensorRT one when the run has a verified engine."""
    onnx = manifest.record("onnx")
    if onnx is None:
        raise ArtifactError(f"{run_dir.root}: no verified ONNX export to put in a Triton "
                            "repository (run `mmdeploy export --format onnx`)")
    batch = onnx.batch_range
    if batch["min"] != 1:
        raise ConfigError(f"the export's batch range starts at {batch['min']}; Triton sends "
                          "any batch from 1 up, so export with --batch-range 1,OPT,MAX")
    onnx_files = {n: run_dir.export_dir / n for n in onnx.files if "/" not in n}
    tokenizer = {Path(n).name: run_dir.export_dir / n for n in onnx.files
                 if n.startswith(f"{TOKENIZER_DIR}/")}
    specs = [ModelSpec(name, "onnxruntime_onnx", onnx_files, 1, batch["opt"], batch["max"],
                       "KIND_AUTO", "onnx", tokenizer)]
    engine = manifest.record("tensorrt")
    if engine is not None:
        plan = engine.details["engine"]
        sidecar = EngineSidecar.load(run_dir.export_dir / engine.details["sidecar"])
        if sidecar.onnx_sha256 != onnx.files[ONNX_FILE]["sha256"]:
            raise ArtifactError(f"{plan}: built from another ONNX graph than the run's "
                                f"{ONNX_FILE}; rebuild it with `export --format tensorrt`")
        low, opt, high = sidecar.profile.min[0], sidecar.profile.opt[0], sidecar.profile.max[0]
        if low == 1:
            specs.append(ModelSpec(f"{name}_tensorrt", "tensorrt_plan",
                                   {"model.plan": run_dir.export_dir / plan},
                                   low, opt, high, "KIND_GPU", "tensorrt", tokenizer))
    return specs


def write_repository(run_path: str | Path, out: str | Path | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """Write and validate the repository for a run's verified export; it replaces `out`
    (default RUN/triton) only once it is complete and valid."""
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    manifest = Manifest.load(run_dir.manifest_path)
    out = Path(out) if out is not None else run_dir.root / "triton"
    name = repository_name(run_dir)
    specs = plan_models(run_dir, manifest, name)
    model_config_pb2()  # the extra is missing: say so before anything is copied
    for spec in specs:
        manifest.exports[spec.source].verify_files(run_dir.export_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for spec in specs:
            _write_model(staging / spec.name, spec, run_dir, run)
            log(f"triton: {spec.name} ({spec.platform}, max batch {spec.batch_max})")
        _write_guide(staging, specs[0], run_dir)
        validate_repository(staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.exports["triton"] = _record(manifest, specs, out)
    manifest.save(run_dir.manifest_path)
    return out


def _record(manifest: Manifest, specs: list[ModelSpec], out: Path) -> ExportRecord:
    """The repository as one of the run's exports. Its files live in the repository, each
    model's hashed in its own `mmdeploy.json`, so the record lists none of export/."""
    onnx = manifest.exports["onnx"]
    return ExportRecord(
        backend="triton", precision=onnx.precision, batch_range=dict(onnx.batch_range),
        check={"kind": "triton", "passed": True,
               "checked": "each config.pbtxt against Triton's schema and its graph; the "
                          "model files' sha256"},
        inputs=onnx.inputs, outputs=onnx.outputs, opset=onnx.opset,
        details={"repository": str(out.resolve()),
                 "models": {spec.name: spec.platform for spec in specs}})


def _write_model(model_dir: Path, spec: ModelSpec, run_dir: RunDir, run) -> None:
    from google.protobuf import text_format

    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    for target, source in spec.files.items():
        shutil.copyfile(source, version_dir / target)
    if spec.tokenizer:
        (model_dir / TOKENIZER_DIR).mkdir()
        for target, source in spec.tokenizer.items():
            shutil.copyfile(source, model_dir / TOKENIZER_DIR / target)
    graph = model_dir / VERSION / ONNX_FILE
    if spec.platform == "tensorrt_plan":  # the graph the engine was built from, for checks
        graph = model_dir / "source" / ONNX_FILE
        graph.parent.mkdir()
        for name, source in _onnx_files(run_dir).items():
            shutil.copyfile(source, graph.parent / name)
    config = build_config(spec, GraphInterface.read(graph))
    atomic_write_text(model_dir / CONFIG_FILE, text_format.MessageToString(config))
    atomic_write_text(model_dir / LABELS_FILE, "".join(f"{c}\n" for c in run.class_names))
    # The model files are hashed; the config and labels are text a user may tune, and the
    # config is checked by content instead.
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*/*")
                   if p.is_file())
    atomic_write_json(model_dir / METADATA_FILE, {
        "run": str(run_dir.root.resolve()), "adapter": run.adapter, "task": run.task,
        "graph": graph.relative_to(model_dir).as_posix(),
        "batch_range": {"min": spec.batch_min, "opt": spec.batch_opt, "max": spec.batch_max},
        "preprocessing": run.preprocessing,
        "files": {f: sha256_file(model_dir / f) for f in files},
    })


def _onnx_files(run_dir: RunDir) -> dict[str, Path]:
    return {p.name: p for p in sorted(run_dir.export_dir.glob(f"{ONNX_FILE}*"))
            if p.name in (ONNX_FILE, f"{ONNX_FILE}.data")}


def _write_guide(root: Path, spec: ModelSpec, run_dir: RunDir) -> None:
    shutil.copyfile(Path(__file__).with_name("triton_client.py"), root / "client.py")
    atomic_write_text(root / "README.md", _GUIDE.format(name=spec.name, run=run_dir.root,
                                                        batch=spec.batch_max))


def _replace(staging: Path, out: Path) -> None:
    """Swap the finished repository into place; an earlier one is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_GUIDE = """\
# Triton model repository for `{run}`

Written by `mmdeploy export --format triton`; validated against Triton's config schema and
the exported graph. Every model folder lists the sha256 of its model files in
`mmdeploy.json`.

Serve it (CPU or GPU; ONNX Runtime backend, dynamic batching up to {batch} images):

    docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v "$PWD":/models nvcr.io/nvidia/tritonserver:25.10-py3 \\
        tritonserver --model-repository=/models

(drop `--gpus all` on a machine without a GPU; a `{name}_tensorrt` model, when present,
needs a GPU and the TensorRT version its engine was built with).

Call it from Python with the toolkit's own preprocessing
(`pip install 'mm-peft-deploy[triton]'`):

    python client.py --url localhost:8001 --model {name} photo.jpg more.png

`client.py` decodes and preprocesses exactly as `mmdeploy infer` does (the preprocessing
is recorded in `{name}/mmdeploy.json`), sends `pixel_values` [batch, 3, H, W] FP32 over gRPC
and prints one JSON row per image, like `mmdeploy infer`.
"""
