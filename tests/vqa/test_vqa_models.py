"""VQA models at tiny size: padding takes part nowhere, the question cache gives what the text
tower gives, every model learns, and the trainer's frozen-prefix cache trains the same model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmdeploy.artifacts import RunDir, load_safetensors
from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import load_labeled, make_splits
from mmdeploy.models.hmmoe.config import HMMoEConfig
from mmdeploy.models.hmmoe.layer import HMMoELayer
from mmdeploy.registry import VQA_ADAPTERS, adapter_class
from mmdeploy.runs import RunConfig
from mmdeploy.trainers import loop
from mmdeploy.trainers import vqa as vqa_training
from mmdeploy.trainers.split import decode

OPTIONS = {"hmmoe": {"num_layers": 2, "rank": 4}, "ganet": {"rank": 16, "k": 3},
           "lora": {"rank": 4}}


@pytest.fixture
def vqa_backbone(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "backbones"
    return lambda: load_backbone(BackboneConfig(cache_dir=str(cache)))


def build(name, backbone, answers):
    cls = adapter_class(name, "vqa")
    return cls(backbone, cls.config_class.from_dict(OPTIONS.get(name, {})), answers)


@pytest.mark.parametrize("deploy_form", [False, True])
@pytest.mark.parametrize("router", ["sample", "token"])
def test_hmmoe_layer_ignores_padding(deploy_form, router):
    torch.manual_seed(0)
    config = HMMoEConfig(rank=4, top_k=2, router=router)
    layer = HMMoELayer(8, 6, config).eval()
    for expert in layer.experts:  # a trained layer: its output projections are not zero
        torch.nn.init.normal_(expert.up.weight)
    layer.deploy_form = deploy_form
    x = torch.randn(2, 5, 8)
    lengths = [3, 6]
    questions = [torch.randn(1, n, 6) for n in lengths]
    padded = torch.randn(2, 6, 6)  # what sits at padded positions must not matter
    mask = torch.zeros(2, 6)
    for row, (question, n) in enumerate(zip(questions, lengths, strict=True)):
        padded[row, :n] = question[0]
        mask[row, :n] = 1
    together = layer(x, padded, mask)
    for row, question in enumerate(questions):
        alone = layer(x[row:row + 1], question, torch.ones(1, question.shape[1]))
        torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    assert together.abs().sum() > 0
    # and without a mask every context token counts, as the classification path has it
    torch.testing.assert_close(layer(x[1:], padded[1:]), together[1:], rtol=1e-5, atol=1e-6)


def test_the_question_cache_gives_what_the_text_tower_gives(vqa_backbone, vqa_manifest):
    backbone = vqa_backbone()
    model = build("hmmoe", backbone, ["yes", "no"]).eval()
    for adapter in model.adapters:
        torch.nn.init.normal_(adapter.experts[0].up.weight)
    questions = ["is there a red shape?", "what?", "what is the shape?"]
    for question in questions:  # fill the cache one unpadded question at a time
        alone = backbone.tokenize([question])
        model.encode_question(alone["input_ids"], alone["attention_mask"])
    tokens = backbone.tokenize(questions)
    assert not tokens["attention_mask"].all()  # padded
    pixels = decode(load_labeled(str(vqa_manifest)).samples[::4][:3], backbone, "decode").inputs
    with torch.no_grad():
        cached = model(pixels, tokens["input_ids"], tokens["attention_mask"])[0]
        pooled, states = backbone.encode_text(tokens)
        tower = model.answer(model.encode_image(pixels, states, tokens["attention_mask"]),
                             pooled)[0]
    torch.testing.assert_close(cached, tower, rtol=1e-4, atol=1e-5)


def test_a_pooled_feature_head_caches_only_the_pooled_question(vqa_backbone, vqa_manifest):
    """Product fusion never reads the token states: the cache keeps the pooled features
    alone, and the model answers as it does from the text tower."""
    backbone = vqa_backbone()
    model = build("product-fusion", backbone, ["yes", "no"]).eval()
    torch.nn.init.normal_(model.fusion.classifier.weight)
    tokens = backbone.tokenize(["is there a red shape?", "what?", "what is the shape?"])
    pixels = decode(load_labeled(str(vqa_manifest)).samples[::4][:3], backbone, "decode").inputs
    with torch.no_grad():
        pooled, states = model.encode_question(tokens["input_ids"], tokens["attention_mask"])
        cached = model(pixels, tokens["input_ids"], tokens["attention_mask"])[0]
        tower_pooled, tower_states = backbone.encode_text(tokens)
        tower = model.answer(model.encode_image(pixels, tower_states, tokens["attention_mask"]),
                             tower_pooled)[0]
    assert states == () and len(tower_states) > 1
    assert model._question_cache_bytes == pooled.numel() * pooled.element_size()
    torch.testing.assert_close(pooled, tower_pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached, tower, rtol=1e-5, atol=1e-6)


def test_the_question_cache_keeps_to_its_budget(vqa_backbone, monkeypatch):
    from mmdeploy.models.vqa import base

    backbone = vqa_backbone()
    model = build("hmmoe", backbone, ["yes", "no"]).eval()  # keeps the token states too
    questions = [f"is there a shape number {i}?" for i in range(12)]
    tokens = backbone.tokenize(questions)
    with torch.no_grad():
        expected = backbone.encode_text(tokens)[0]
        model.encode_question(tokens["input_ids"][:1], tokens["attention_mask"][:1])
        one_entry = model._question_cache_bytes
        monkeypatch.setattr(base, "QUESTION_CACHE_BYTES", 3 * one_entry)
        for first in range(0, 12, 2):  # two new questions a batch: the oldest make room
            pooled = model.encode_question(tokens["input_ids"][first:first + 2],
                                           tokens["attention_mask"][first:first + 2])[0]
            torch.testing.assert_close(pooled, expected[first:first + 2], rtol=1e-5,
                                       atol=1e-6)
            assert model._question_cache_bytes <= 3 * one_entry
        assert len(model._question_cache) == 2  # a third would not fit beside two more
        again = model.encode_question(tokens["input_ids"], tokens["attention_mask"])[0]
    # a batch over the budget is answered all the same; its own questions are never dropped
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-6)


def _fit(model, split, steps=8, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = split.batch(torch.arange(len(split)))
    losses = []
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(loop.logits_of(model, batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(VQA_ADAPTERS))
def test_every_vqa_model_learns(vqa_backbone, vqa_manifest, name):
    torch.manual_seed(0)
    data = load_labeled(str(vqa_manifest))
    splits = make_splits(data, shots=2, val_per_class=1, test_per_class=1, seed=0)
    backbone = vqa_backbone()
    model = build(name, backbone, splits.class_names)
    split = decode(splits.train, backbone, "decode")
    if model.needs_bank:
        vqa_training.build_bank(model.eval(), split, 8, "cpu", seed=0)
    losses = _fit(model, split)
    # One modality alone cannot tell the answers of different questions about one image (or
    # of one question about different images) apart: its loss has a floor well above zero
    # and falls slowly towards it; the models that see both fall fast.
    if name in ("image-only", "question-only"):
        assert losses[-1] < losses[0], losses
    else:
        assert losses[-1] < 0.8 * losses[0], losses


def _train(tmp_path, manifest, adapter, **train_options):
    backbone_config = BackboneConfig(cache_dir=str(tmp_path / "cache"))
    backbone = load_backbone(backbone_config)
    data = DataConfig(source=str(manifest), shots=2, val_per_class=1, test_per_class=1)
    splits = data.splits()
    run = RunConfig(adapter=adapter, adapter_config=OPTIONS.get(adapter, {}),
                    backbone=backbone_config, backbone_identity=backbone.identity, data=data,
                    class_names=splits.class_names, task=splits.task,
                    train=TrainConfig(**{"epochs": 1, "batch_size": 8, "seed": 1,
                                         **train_options}))
    run_dir = RunDir(tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
    run_dir.prepare_new(overwrite=False)
    return loop.train(run, run_dir, backbone, splits), run_dir


@pytest.mark.parametrize("adapter", ["hmmoe", "ganet"])
def test_the_frozen_prefix_cache_trains_the_same_vqa_model(tmp_path, vqa_manifest, adapter):
    cached, cached_dir = _train(tmp_path, vqa_manifest, adapter)
    plain, plain_dir = _train(tmp_path, vqa_manifest, adapter, cache_features=False)
    a, b = load_safetensors(cached_dir.weights_path), load_safetensors(plain_dir.weights_path)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (cached.best_step, cached.test_accuracy) == (plain.best_step, plain.test_accuracy)


def test_train_cli_records_the_vqa_task(cli, tmp_path, vqa_manifest):
    out = tmp_path / "run"
    result = cli(["train", "--adapter", "product-fusion", "--data", vqa_manifest,
                  "--out", out, "--shots", "2", "--val-per-class", "1",
                  "--test-per-class", "1", "--max-steps", "3", "--batch-size", "8"])
    assert result.code == 0, result
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task"] == "vqa" and config["adapter"] == "product-fusion"
    assert config["class_names"] == sorted(["red", "green", "blue", "circle", "square",
                                            "yes", "no"])
    export = cli(["export", "--run", out, "--format", "onnx"])  # the two-input engine
    assert export.code == 0, export
    record = json.loads((out / "export" / "manifest.json").read_text())["exports"]["onnx"]
    assert [i["name"] for i in record["inputs"]] == ["pixel_values", "input_ids",
                                                     "attention_mask"]
    assert record["check"]["passed"] and "tokenizer/question_limits.json" in record["files"]
    refused = cli(["train", "--adapter", "zero-shot", "--data", vqa_manifest, "--out",
                   tmp_path / "zs"])
    assert refused.code == 1 and refused.error_lines() == [
        "error: adapter 'zero-shot' has no vqa form; for vqa choose from ganet, hmmoe, "
        "image-only, late-fusion, late-fusion-mlp, lora, product-fusion, question-only"]


@pytest.mark.parametrize("name", ["hmmoe", "ganet", "lora"])
def test_the_deploy_form_answers_as_the_trained_model(vqa_backbone, vqa_manifest, name):
    """The form the two-input export will take (text tower kept, no question cache, LoRA
    merged, HMMoE's dense gates, GA-Net's frozen bank side) gives the same logits."""
    torch.manual_seed(0)
    splits = make_splits(load_labeled(str(vqa_manifest)), shots=2, val_per_class=1,
                         test_per_class=1, seed=0)
    backbone = vqa_backbone()
    model = build(name, backbone, splits.class_names)
    split = decode(splits.train, backbone, "decode")
    if model.needs_bank:
        vqa_training.build_bank(model.eval(), split, 8, "cpu", seed=0)
    _fit(model, split, steps=3)
    batch = split.batch(torch.arange(len(split)))
    with torch.no_grad():
        trained = loop.logits_of(model.eval(), batch)
        deployed = loop.logits_of(model.to_deploy(), batch)
    assert model.backbone.text is not None
    torch.testing.assert_close(deployed, trained, rtol=1e-4, atol=1e-4)
