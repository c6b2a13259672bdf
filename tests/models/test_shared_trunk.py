"""One frozen trunk, one branch per run (`models.shared`): trunk + branch is each run's own
model, for a mixed set of adapters on the tiny backbone (4 image blocks)."""

import pytest
import torch

from mmdeploy.errors import BackboneMismatchError, ConfigError
from mmdeploy.models.baselines.config import LinearProbeConfig, LoRAConfig, ZeroShotConfig
from mmdeploy.models.baselines.model import LinearProbeModel, LoRAModel, ZeroShotModel
from mmdeploy.models.ganet.config import GANetConfig
from mmdeploy.models.ganet.model import GANetModel
from mmdeploy.models.hmmoe.config import HMMoEConfig
from mmdeploy.models.hmmoe.model import HMMoEModel
from mmdeploy.models.shared import Trunk, as_branch, trunk_block

CLASSES = ["bear", "cat", "zebra"]
TEMPLATE = "a photo of a {}."


def _trained(model):
    """Adapter weights moved off their initial values, the same for the same seed."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hmmoe(backbone, layers):
    torch.manual_seed(0)
    return _trained(HMMoEModel(backbone, HMMoEConfig(rank=4, num_layers=layers), CLASSES,
                               TEMPLATE))


def ganet(backbone):
    torch.manual_seed(0)
    model = GANetModel(backbone, GANetConfig(rank=8), CLASSES, TEMPLATE)
    model.build_bank(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                     torch.arange(12) % len(CLASSES), [""] * 12, seed=0)
    return _trained(model)


def probe(backbone):
    torch.manual_seed(0)
    return _trained(LinearProbeModel(backbone, LinearProbeConfig(), CLASSES, TEMPLATE))


def zero_shot(backbone):
    return ZeroShotModel(backbone, ZeroShotConfig(), CLASSES, TEMPLATE).eval()


MAKERS = {
    "hmmoe-last2": lambda b: hmmoe(b, 2),
    "hmmoe-last3": lambda b: hmmoe(b, 3),
    "ganet": ganet,
    "probe": probe,
    "zero-shot": zero_shot,
}


def _check_shared(backbone_factory, names, expected_block):
    """Trunk + each branch against each run's own (training-form) model, to float error."""
    references = {name: MAKERS[name](backbone_factory()) for name in names}
    block = trunk_block(references)
    assert block == expected_block
    trunk = Trunk(backbone_factory(), block)
    branches = {name: as_branch(MAKERS[name](backbone_factory()), block) for name in names}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch in (1, 5):
            pixels = torch.randn(batch, 3, 32, 32, generator=generator)
            features = trunk(pixels)
            for name in names:
                expected, got = references[name](pixels), branches[name](features)
                for want, have in zip(expected, got, strict=True):
                    torch.testing.assert_close(have, want, atol=1e-5, rtol=0, msg=name)


def test_mixed_set_shares_the_tower_up_to_the_earliest_adapted_block(backbone_factory):
    # HMMoE on the last 3 blocks puts the trunk at block 1; the last-2 run runs block 1
    # itself, the others the whole rest of the tower before their pooled-feature heads.
    _check_shared(backbone_factory, list(MAKERS), expected_block=1)


def test_set_acting_after_pooling_shares_the_pooled_features(backbone_factory):
    _check_shared(backbone_factory, ["ganet", "probe", "zero-shot"], expected_block=4)


def test_trunk_tokens_are_the_tokens_entering_the_block(backbone_factory):
    pixels = torch.randn(3, 3, 32, 32)
    reference = backbone_factory()
    with torch.no_grad():
        for block in (0, 2):
            expected = reference.vision_tokens(pixels, block)
            torch.testing.assert_close(Trunk(backbone_factory(), block)(pixels), expected,
                                       atol=0, rtol=0)


def test_lora_is_refused(backbone_factory):
    models = {"probe": probe(backbone_factory()),
              "lora": LoRAModel(backbone_factory(), LoRAConfig(), CLASSES, TEMPLATE)}
    with pytest.raises(ConfigError, match="lora adapts every block"):
        trunk_block(models)


def test_another_backbone_is_refused(backbone_factory, towers):
    from mmdeploy.backbone import load_backbone
    from mmdeploy.config import BackboneConfig

    other = load_backbone(BackboneConfig(spec=towers(4)))
    models = {"probe": probe(backbone_factory()), "other": zero_shot(other)}
    with pytest.raises(BackboneMismatchError, match="other .* and probe .*different backbones"):
        trunk_block(models)
