"""Baselines share the adapters' export path: LoRA merges into the frozen weights."""

import torch

from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig
from mmdeploy.models.baselines.config import LinearProbeConfig, LoRAConfig
from mmdeploy.models.baselines.model import LinearProbeModel, LoRAModel

CLASSES = ["bear", "cat", "zebra"]


def fresh(tmp_path):
    return load_backbone(BackboneConfig(cache_dir=str(tmp_path / "cache")))


def test_lora_merged_equals_unmerged(tmp_path):
    model = LoRAModel(fresh(tmp_path), LoRAConfig(rank=4), CLASSES, "{}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    deploy = LoRAModel(fresh(tmp_path), LoRAConfig(rank=4), CLASSES, "{}")
    deploy.load_adapter_state_dict(model.adapter_state_dict())
    deploy.to_deploy()
    assert not hasattr(deploy, "image_loras")  # folded into the frozen linears
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before, after = model.eval()(pixels)[0], deploy(pixels)[0]
    assert (before - after).abs().max() < 1e-5
    assert (before - LoRAModel(fresh(tmp_path), LoRAConfig(rank=4), CLASSES, "{}").eval()(
        pixels)[0]).abs().max() > 1e-3  # and the LoRA did change the function


def test_linear_probe_trains_only_its_head(tmp_path):
    model = LinearProbeModel(fresh(tmp_path), LinearProbeConfig(), CLASSES, "{}")
    assert set(model.adapter_state_dict()) == {"classifier.weight", "classifier.bias"}
    logits, embeddings = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
