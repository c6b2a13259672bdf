"""Hub ids as backbones, resolved offline from a Hugging Face cache this test builds in
huggingface_hub's own layout (`models--ORG--NAME/refs/REV` holding a commit,
`snapshots/COMMIT/` the files): nothing reaches a hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from mmdeploy.backbone import build_tiny_clip, load_backbone
from mmdeploy.config import BackboneConfig
from mmdeploy.errors import ConfigError
from mmdeploy.hub import is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, offline, in place of the machine's."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str, files: Path, ref: str = "main",
                commit: str = COMMIT, drop: str | None = None) -> Path:
    """Put `files` in the cache as `repo_id` at `ref` (without the files matching `drop`)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(files, snapshot, ignore=shutil.ignore_patterns(drop) if drop else None)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert is_hub_id("openai/clip-vit-base-patch32")
    assert is_hub_id("facebook/dinov2-small@main")
    assert not is_hub_id("tiny") and not is_hub_id(str(tmp_path))
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id(str(tmp_path / "org" / "name"))  # an existing folder is a folder


def test_a_cached_hub_id_loads_offline_and_records_its_revision(hub_cache, tiny_checkpoint):
    cache_model(hub_cache, "acme/tiny-clip", tiny_checkpoint)
    local = load_backbone(BackboneConfig(spec=str(tiny_checkpoint)))
    hub = load_backbone(BackboneConfig(spec="acme/tiny-clip"))
    assert hub.identity == {**local.identity, "revisions": {"acme/tiny-clip": COMMIT}}
    tagged = cache_model(hub_cache, "acme/tiny-clip", tiny_checkpoint, ref="v1",
                         commit="f" * 40)
    assert tagged.is_dir()
    pinned = load_backbone(BackboneConfig(spec="acme/tiny-clip@v1"))
    assert pinned.identity["revisions"] == {"acme/tiny-clip": "f" * 40}


def test_separate_towers_by_hub_id(hub_cache, tiny_checkpoint):
    cache_model(hub_cache, "acme/vision", tiny_checkpoint)
    with pytest.raises(ConfigError, match="acme/missing-text: acme/missing-text is not in the "
                                          "Hugging Face cache .* HF_HUB_OFFLINE=1"):
        load_backbone(BackboneConfig(spec="acme/vision,acme/missing-text"))


def test_not_cached_bin_only_and_a_bad_revision_are_one_line(hub_cache, tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"^acme/absent: acme/absent is not in the Hugging "
                                          r"Face cache"):
        load_backbone(BackboneConfig(spec="acme/absent"))
    pickled = cache_model(hub_cache, "acme/pickled", tiny_checkpoint, drop="*.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle, never opened")
    with pytest.raises(ConfigError, match="no safetensors weights .* only .bin weights is "
                                          "refused"):
        load_backbone(BackboneConfig(spec="acme/pickled"))
    cache_model(hub_cache, "acme/tiny-clip", tiny_checkpoint)
    with pytest.raises(ConfigError, match="revision 'v9' of acme/tiny-clip is not in the "
                                          "Hugging Face cache"):
        load_backbone(BackboneConfig(spec="acme/tiny-clip@v9"))


def test_train_takes_a_hub_id(cli, hub_cache, tiny_checkpoint, tmp_path):
    cache_model(hub_cache, "acme/tiny-clip", tiny_checkpoint)
    result = cli(["train", "--adapter", "linear-probe", "--backbone", "acme/tiny-clip",
                  "--out", tmp_path / "run", "--max-steps", "1", "--shots", "1"])
    assert result.code == 0, str(result)
    missing = cli(["train", "--adapter", "linear-probe", "--backbone", "acme/absent",
                   "--out", tmp_path / "nothing", "--max-steps", "1"])
    assert missing.code == 1 and missing.error_lines() == [
        f"error: acme/absent: acme/absent is not in the Hugging Face cache ({hub_cache}) and "
        "HF_HUB_OFFLINE=1 forbids fetching it"]
    assert not (tmp_path / "nothing").exists()
