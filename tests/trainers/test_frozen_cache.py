"""Frozen-prefix caching: training on the cache ends with the weights and metrics training
without it gives, runs the image tower once per training and validation image, spills to a
memory-mapped file past its bound, and is refused for a tower it cannot split."""

import json
import re

import pytest
import torch

from mmdeploy.artifacts import RunDir, load_safetensors
from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.errors import MmdeployError
from mmdeploy.runs import RunConfig
from mmdeploy.trainers import frozen_cache, loop

OPTIONS = {"hmmoe": {"num_layers": 2, "rank": 4}, "ganet": {"rank": 16}}


@pytest.fixture
def train(tmp_path):
    """Train a fresh model; returns (result, run_dir, image-tower forward calls)."""
    def run_training(adapter, **train_options):
        backbone_config = BackboneConfig(cache_dir=str(tmp_path / "cache"))
        backbone = load_backbone(backbone_config)
        data = DataConfig(shots=2, val_per_class=3, test_per_class=3)
        splits = data.splits()
        run = RunConfig(adapter=adapter, adapter_config=OPTIONS.get(adapter, {}),
                        backbone=backbone_config, backbone_identity=backbone.identity,
                        data=data, class_names=splits.class_names,
                        train=TrainConfig(**{"epochs": 3, "batch_size": 8, "seed": 1,
                                             **train_options}))
        run_dir = RunDir(tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        run_dir.prepare_new(overwrite=False)
        calls = []
        backbone.vision.register_forward_pre_hook(lambda module, args: calls.append(1))
        result = loop.train(run, run_dir, backbone, splits)
        return result, run_dir, len(calls)

    return run_training


def _metrics(run_dir):
    lines = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "grad_norm"} for line in lines]


@pytest.mark.parametrize("adapter", ["linear-probe", "ganet", "hmmoe", "zero-shot"])
def test_the_cache_trains_the_same_model(train, adapter):
    cached, cached_dir, cached_calls = train(adapter)
    plain, plain_dir, plain_calls = train(adapter, cache_features=False)

    a, b = load_safetensors(cached_dir.weights_path), load_safetensors(plain_dir.weights_path)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (cached.best_step, cached.best_val_accuracy, cached.test_accuracy) == (
        plain.best_step, plain.best_val_accuracy, plain.test_accuracy)
    for x, y in zip(_metrics(cached_dir), _metrics(plain_dir), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            expected = pytest.approx(y[key], rel=1e-4, abs=1e-5) \
                if isinstance(y[key], float) else y[key]
            assert x[key] == expected, (key, x, y)

    # 20 training and 30 validation images: one chunk each; the test split (30 images,
    # batch 8) runs the whole model: 4 batches; HMMoE's split inside the tower is checked
    # once, whole against split: 2 passes.
    assert cached_calls == 1 + 1 + 4 + (2 if adapter == "hmmoe" else 0)
    if adapter != "zero-shot":  # it validates once and trains nothing: no pass to save
        assert plain_calls > cached_calls


def test_lora_changes_the_first_block_and_caches_nothing(train):
    _, _, calls = train("lora", epochs=1)
    # 3 steps, then 4 validation and 4 test batches: every one through the tower
    assert calls == 3 + 4 + 4


def test_a_cache_over_its_bound_is_a_memory_mapped_file_removed_after(train, monkeypatch):
    spilled = []
    real_from_file = torch.from_file
    monkeypatch.setattr(frozen_cache.torch, "from_file",
                        lambda path, **kw: spilled.append(path) or real_from_file(path, **kw))
    mapped, mapped_dir, _ = train("hmmoe", cache_memory_mb=0)
    in_memory, memory_dir, _ = train("hmmoe")

    assert [p.rsplit("/", 2)[-2:] for p in spilled] == [["feature-cache", "train.bin"],
                                                       ["feature-cache", "val.bin"]]
    assert not mapped_dir.feature_cache_dir.exists()
    a, b = load_safetensors(mapped_dir.weights_path), load_safetensors(memory_dir.weights_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mapped.test_accuracy == in_memory.test_accuracy


def test_a_tower_the_cache_cannot_split_is_refused(train, monkeypatch):
    from mmdeploy.backbone import Backbone

    real = Backbone.image_features_from
    monkeypatch.setattr(Backbone, "image_features_from",
                        lambda self, tokens, block: real(self, tokens, block) + 1e-2)
    with pytest.raises(MmdeployError, match="does not reproduce .*--no-cache"):
        train("hmmoe")


def test_no_cache_from_the_command_line(cli, tmp_path):
    out = tmp_path / "run"
    result = cli(["train", "--adapter", "linear-probe", "--out", out, "--max-steps", "2",
                  "--shots", "1", "--no-cache"])
    assert result.code == 0, str(result)
    assert "cache train" not in result.stderr and "decode train" in result.stderr
    assert re.search(r"2 steps in [\d.]+ s \(prepare [\d.]+ s, train [\d.]+ s, test [\d.]+ s\)",
                     result.stdout), result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["train"]["cache_features"] is False


@pytest.mark.parametrize("adapter", ["ganet", "hmmoe"])
def test_a_feature_store_computes_each_split_once_across_runs(train, tmp_path, adapter):
    store = tmp_path / "store"
    first, first_dir, first_calls = train(adapter, feature_store=str(store), seed=2)
    again, again_dir, again_calls = train(adapter, feature_store=str(store), seed=2)
    alone, alone_dir, _ = train(adapter, seed=2)

    assert len(list(store.glob("*.safetensors"))) == 2  # train and validation
    # the second run reads both splits: no chunk through the tower for them
    assert first_calls - again_calls == 2
    for run_dir in (again_dir, first_dir):
        a, b = load_safetensors(run_dir.weights_path), load_safetensors(alone_dir.weights_path)
        assert all(torch.equal(a[k], b[k]) for k in a), run_dir
    assert first.test_accuracy == again.test_accuracy == alone.test_accuracy


def test_the_store_keys_by_prefix_and_image_bytes_and_ignores_a_bad_entry(train, tmp_path,
                                                                          monkeypatch):
    from mmdeploy.trainers import feature_store

    store = tmp_path / "store"
    train("ganet", feature_store=str(store))
    train("hmmoe", feature_store=str(store))  # another cut of the tower: its own entries
    entries = sorted(store.glob("*.safetensors"))
    assert len(entries) == 4

    # an entry that is not what its name says (here: truncated) is recomputed and rewritten
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    computed = []
    real_compute = frozen_cache._compute
    monkeypatch.setattr(frozen_cache, "_compute",
                        lambda *args: computed.append(1) or real_compute(*args))
    train("ganet", feature_store=str(store))
    train("hmmoe", feature_store=str(store))
    assert len(computed) == 1
    assert len(list(store.glob("*.safetensors"))) == 4

    # the key covers each image's bytes, not only its name
    backbone = load_backbone(BackboneConfig(cache_dir=str(tmp_path / "cache")))
    samples = DataConfig(shots=1).splits().train[:2]
    key = feature_store.entry_key(backbone, 4, samples, "cpu")
    changed = [samples[0], type(samples[1])(samples[1].name, samples[1].image[::-1].copy(),
                                            samples[1].label)]
    assert feature_store.entry_key(backbone, 4, changed, "cpu") != key
    assert feature_store.entry_key(backbone, 2, samples, "cpu") != key
