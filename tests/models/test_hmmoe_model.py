"""HMMoE on a real (tiny) transformers image tower: no-op at init, two forms, one function."""

import pytest
import torch

from mmdeploy.models.baselines.model import ZeroShotModel
from mmdeploy.models.hmmoe.config import HMMoEConfig
from mmdeploy.models.hmmoe.model import HMMoEModel

CLASSES = ["bear", "cat", "zebra"]
TEMPLATE = "a photo of a {}."


def randomise(model):
    """Make every trainable weight non-zero, so the adapter really changes the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)


def test_untrained_adapter_equals_the_frozen_backbone(backbone_factory):
    pixels = torch.randn(5, 3, 32, 32)
    frozen = ZeroShotModel(backbone_factory(), None, CLASSES, TEMPLATE).eval()
    adapted = HMMoEModel(backbone_factory(), HMMoEConfig(), CLASSES, TEMPLATE).eval()
    with torch.no_grad():
        expected, adapted_out = frozen(pixels), adapted(pixels)
    assert torch.equal(expected[0], adapted_out[0])
    assert torch.equal(expected[1], adapted_out[1])


def test_trainable_share_and_only_adapter_weights_are_saved(backbone_factory):
    backbone = backbone_factory()
    keys_before = set(backbone.state_dict())
    model = HMMoEModel(backbone, HMMoEConfig(rank=4), CLASSES, TEMPLATE)
    report = model.parameter_report()
    assert report["trainable"] == sum(t.numel() for t in model.adapter_state_dict().values())
    assert 0 < report["trainable_share"] < 0.2
    assert all(k.startswith(("adapters.", "logit_scale")) for k in model.adapter_state_dict())
    assert set(backbone.state_dict()) == keys_before  # hooks leave checkpoint keys alone
    backbone.assert_frozen()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_deploy_form_matches_training_form(backbone_factory, top_k):
    config = HMMoEConfig(top_k=top_k, text_lora_rank=4)
    training = HMMoEModel(backbone_factory(), config, CLASSES, TEMPLATE)
    randomise(training)
    deploy = HMMoEModel(backbone_factory(), config, CLASSES, TEMPLATE)
    deploy.load_adapter_state_dict(training.adapter_state_dict())
    deploy.to_deploy()
    training.eval()
    assert deploy.backbone.text is None  # serving runs no text tower
    for batch in (1, 7, 32):
        pixels = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            reference, candidate = training(pixels), deploy(pixels)
        assert (reference[0] - candidate[0]).abs().max() < 1e-5
        assert (reference[1] - candidate[1]).abs().max() < 1e-5


def test_adapter_changes_the_output_once_trained(backbone_factory):
    model = HMMoEModel(backbone_factory(), HMMoEConfig(), CLASSES, TEMPLATE).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels)[0]
        randomise(model)
        after = model(pixels)[0]
    assert (before - after).abs().max() > 1e-3


def test_balance_loss_only_in_training(backbone_factory):
    model = HMMoEModel(backbone_factory(), HMMoEConfig(top_k=2), CLASSES, TEMPLATE)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert model.auxiliary_loss() > 0
    model.eval()
    model(torch.randn(4, 3, 32, 32))
    assert model.auxiliary_loss() == 0


def test_one_backbone_carries_one_adapter(backbone_factory):
    backbone = backbone_factory()
    HMMoEModel(backbone, HMMoEConfig(), CLASSES, TEMPLATE)
    with pytest.raises(ValueError, match="already carries an adapter"):
        HMMoEModel(backbone, HMMoEConfig(), CLASSES, TEMPLATE)


def test_num_layers_beyond_the_tower_is_refused(backbone_factory):
    with pytest.raises(ValueError, match="num_layers"):
        HMMoEModel(backbone_factory(), HMMoEConfig(num_layers=9), CLASSES, TEMPLATE)


def test_caption_context(backbone_factory):
    """Captions steer the adapter; no caption is the empty caption, which the export bakes in."""
    config = HMMoEConfig(context="captions")
    model = HMMoEModel(backbone_factory(), config, CLASSES, TEMPLATE)
    randomise(model)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        striped = model(pixels, ["a striped animal", "a striped animal"])[0]
        furry = model(pixels, ["a furry animal", "a furry animal"])[0]
        no_caption = model(pixels)[0]
        empty = model(pixels, ["", ""])[0]
        one_by_one = torch.cat([model(pixels[:1], ["a striped animal"])[0],
                                model(pixels[1:], ["a furry animal"])[0]])
        mixed = model(pixels, ["a striped animal", "a furry animal"])[0]
    assert (striped - furry).abs().max() > 1e-3
    assert torch.equal(no_caption, empty)
    assert torch.allclose(mixed, one_by_one, atol=1e-6)  # a caption is its own sample's only

    deploy = HMMoEModel(backbone_factory(), config, CLASSES, TEMPLATE)
    deploy.load_adapter_state_dict(model.adapter_state_dict())
    with torch.no_grad():
        assert (deploy.to_deploy()(pixels)[0] - no_caption).abs().max() < 1e-5
