"""Backbones: tiny built and reloaded like a real checkpoint, separate towers, identity."""

from pathlib import Path

import pytest
import torch

from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig
from mmdeploy.errors import BackboneMismatchError, ConfigError
from mmdeploy.models.hmmoe.config import HMMoEConfig
from mmdeploy.models.hmmoe.model import HMMoEModel


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_tiny_is_a_saved_checkpoint_with_tokenizer_and_processor(cache):
    backbone = load_backbone(BackboneConfig(cache_dir=cache))
    files = {p.name for p in (Path(cache) / "tiny-clip-seed0").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "preprocessor_config.json"} <= files
    assert backbone.preprocessor.image_size == (32, 32)
    tokens = backbone.tokenize(["a photo of a zebra."])
    assert tokens["input_ids"].shape[1] > 5
    assert not any(p.requires_grad for p in backbone.parameters())


def test_tiny_is_reproducible_and_identity_checked(cache, tmp_path):
    first = load_backbone(BackboneConfig(cache_dir=cache))
    rebuilt = load_backbone(BackboneConfig(cache_dir=str(tmp_path / "other")))
    assert first.identity == rebuilt.identity
    other_seed = load_backbone(BackboneConfig(cache_dir=cache, tiny_seed=1))
    assert other_seed.identity["weights_sha256"] != first.identity["weights_sha256"]
    with pytest.raises(BackboneMismatchError, match="trained on backbone"):
        load_backbone(BackboneConfig(cache_dir=cache, tiny_seed=1),
                      expected_identity=first.identity)


def test_frozen_towers_stay_in_eval_mode(cache):
    model = HMMoEModel(load_backbone(BackboneConfig(cache_dir=cache)), HMMoEConfig(),
                       ["a", "b"], "{}")
    model.train()
    assert not model.backbone.training and not model.backbone.vision.training
    assert model.adapters[0].training


def test_separate_vision_and_text_towers(towers):
    """A ViT-style image tower and a BERT text tower of another width, as GA-Net's code uses."""
    backbone = load_backbone(BackboneConfig(spec=towers(3)))
    assert (backbone.vision_width, backbone.text_width) == (48, 40)
    model = HMMoEModel(backbone, HMMoEConfig(num_layers=3), ["cat", "dog"], "a {}").eval()
    logits, embeddings = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 2) and embeddings.shape == (3, 40)
    assert model.text_layers == [1, 1, 2]  # proportional depth: 3 image blocks, 2 text blocks


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_backbone(BackboneConfig(spec=str(tmp_path)))


def _dinov2_towers(folder: Path, text_spec: str) -> str:
    from transformers import Dinov2Config, Dinov2Model

    from mmdeploy.backbone import _tiny_image_processor

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=2, image_size=32, patch_size=8)
                ).save_pretrained(folder)
    _tiny_image_processor().save_pretrained(folder)
    return f"{folder},{text_spec.split(',')[1]}"


@pytest.mark.parametrize("tower", ["clip", "clip-vision", "dinov2"])
def test_the_image_tower_split_at_any_block_is_the_whole(tower, cache, towers, tmp_path):
    """`vision_tokens` then `image_features_from` (the trainer's frozen-prefix cache) give
    `image_features` exactly: CLIP with its projection, a CLIP vision tower alone, DINOv2."""
    spec = {"clip": "tiny", "clip-vision": towers(3),
            "dinov2": _dinov2_towers(tmp_path / "dinov2", towers(3))}[tower]
    backbone = load_backbone(BackboneConfig(spec=spec, cache_dir=str(cache)))
    pixels = torch.randn(3, 3, 32, 32)
    whole = backbone.image_features(pixels)
    for block in range(len(backbone.vision_blocks())):
        tokens = backbone.vision_tokens(pixels, block)
        assert tokens.shape == (3, 17, backbone.vision_width)
        torch.testing.assert_close(backbone.image_features_from(tokens, block), whole,
                                   rtol=1e-5, atol=1e-6)


def test_a_sentence_transformers_text_tower_pools_as_it_was_trained(towers, tmp_path):
    """A text checkpoint whose sentence-transformers Pooling module means its tokens gives
    the token mean (and says so in its identity); any other gives the CLS token."""
    import json
    import shutil

    vision_dir, text_dir = towers(3).split(",")
    sentence_dir = tmp_path / "sentence"
    shutil.copytree(text_dir, sentence_dir)
    (sentence_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (sentence_dir / "1_Pooling").mkdir()
    (sentence_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))

    plain = load_backbone(BackboneConfig(spec=f"{vision_dir},{text_dir}"))
    sentence = load_backbone(BackboneConfig(spec=f"{vision_dir},{sentence_dir}"))
    assert "text_pooling" not in plain.identity and sentence.identity["text_pooling"] == "mean"
    tokens = sentence.tokenize(["a cat", "a much longer caption"])
    pooled, hidden = sentence.encode_text(tokens)
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(pooled, (hidden[-1] * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(plain.encode_text(tokens)[0], hidden[-1][:, 0])
