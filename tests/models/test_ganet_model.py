"""GA-Net on the tiny backbone: zero-shot at init, a fixed bank, batch-independent inference,
and one function in its three forms (torch_geometric, dense, deployed)."""

import pytest
import torch

from mmdeploy.errors import ConfigError
from mmdeploy.models.baselines.model import ZeroShotModel
from mmdeploy.models.ganet.config import GANetConfig
from mmdeploy.models.ganet.model import GANetModel

CLASSES = ["bear", "cat", "zebra"]
TEMPLATE = "a photo of a {}."


def training_split(count: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.arange(count) % len(CLASSES)
    return pixels, labels, [""] * count


def ganet(backbone, trained: bool = True, **options) -> GANetModel:
    model = GANetModel(backbone, GANetConfig(**{"rank": 8, **options}), CLASSES, TEMPLATE)
    model.build_bank(*training_split(), seed=0)
    if trained:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_untrained_model_is_the_zero_shot_classifier(backbone_factory):
    pixels = torch.randn(5, 3, 32, 32)
    frozen = ZeroShotModel(backbone_factory(), None, CLASSES, TEMPLATE).eval()
    adapted = ganet(backbone_factory(), trained=False)
    with torch.no_grad():
        expected, got = frozen(pixels)[0], adapted(pixels)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("message_passing", ["pyg", "dense"])
def test_deploy_form_matches_training_form(backbone_factory, message_passing):
    pytest.importorskip("torch_geometric")
    training = ganet(backbone_factory(), message_passing=message_passing)
    deploy = ganet(backbone_factory(), message_passing=message_passing)
    deploy.load_adapter_state_dict(training.adapter_state_dict())
    deploy.to_deploy()
    pixels = torch.randn(9, 3, 32, 32)
    with torch.no_grad():
        for expected, got in zip(training(pixels), deploy(pixels), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert deploy.backbone.text is None  # serving runs no text tower


@pytest.mark.parametrize("deployed", [False, True])
def test_a_query_does_not_depend_on_its_batch(backbone_factory, deployed):
    model = ganet(backbone_factory())
    if deployed:
        model.to_deploy()
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 3, 32, 32, generator=generator)
    others = torch.randn(31, 3, 32, 32, generator=generator)
    with torch.no_grad():
        alone = model(query)[0][0]
        batch = torch.cat([others[:12], query, others[12:]])
        in_batch = model(batch)[0][12]
        order = torch.randperm(32, generator=generator)
        shuffled = model(batch[order])[0][(order == 12).nonzero().item()]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled, alone, atol=1e-5, rtol=0)


def test_bank_holds_class_nodes_then_a_balanced_sample(backbone_factory):
    model = ganet(backbone_factory(), bank_size=7)
    assert model.bank_nodes.shape == (len(CLASSES) + 7, model.classifier.in_features)
    restored = ganet(backbone_factory(), trained=False, bank_size=7)
    restored.load_bank_state_dict({"nodes": model.bank_state_dict()["nodes"] * 1})
    assert torch.equal(restored.bank_nodes, model.bank_nodes)
    assert torch.equal(restored.bank_adjacency, model.bank_adjacency)
    with pytest.raises(KeyError, match="expected"):
        restored.load_bank_state_dict({"nodes": torch.zeros(2, 5)})


def test_training_queries_skip_their_own_bank_copy(backbone_factory):
    model = ganet(backbone_factory(), bank_size=24, tau=-1.0, k=1)
    pixels, _, _ = training_split()
    sample = pixels[:1]  # its node is in the bank
    # k=1: in eval the sample links to its own copy, in training to another node (no
    # dropout anywhere, so the mode changes nothing else)
    with torch.no_grad():
        evaluated = model.eval()(sample)[0]
        trained = model.train()(sample)[0]
    assert not torch.allclose(evaluated, trained, atol=1e-4)


def test_only_adapter_and_head_weights_train(backbone_factory):
    model = ganet(backbone_factory(), trained=False)
    keys = set(model.adapter_state_dict())
    assert keys == {"adapter.down.weight", "adapter.down.bias", "adapter.gcn_weight",
                    "adapter.gcn_bias", "adapter.up.weight", "adapter.up.bias",
                    "classifier.weight", "classifier.bias"}
    assert 0 < model.parameter_report()["trainable_share"] < 0.08
    model.backbone.assert_frozen()


@pytest.mark.parametrize("options", [{"k": 0}, {"tau": 1.0}, {"bank_size": -1},
                                     {"message_passing": "sparse"}, {"rank": 0}])
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError, match="GANetConfig"):
        GANetConfig(**options)


def test_towers_of_equal_width_are_not_a_shared_space(towers, tmp_path):
    """Separate towers that happen to be equally wide (DINOv2-S and MiniLM: 384) were never
    aligned: the head starts at zero, not at the class prompts, and the cosine-head
    adapters learn a projection between the towers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmdeploy.backbone import _tiny_image_processor, load_backbone
    from mmdeploy.config import BackboneConfig

    text_dir = towers(3).split(",")[1]  # a BERT tower 40 wide
    vision_dir = tmp_path / "vision-40"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
                    ).save_pretrained(vision_dir)
    _tiny_image_processor().save_pretrained(vision_dir)
    spec = f"{vision_dir},{text_dir}"
    backbone = load_backbone(BackboneConfig(spec=spec))
    assert backbone.image_embed_dim == backbone.text_embed_dim == 40
    assert not backbone.shared_space

    model = GANetModel(backbone, GANetConfig(rank=8), CLASSES, TEMPLATE)
    assert not model.classifier.weight.any()
    zero_shot = ZeroShotModel(load_backbone(BackboneConfig(spec=spec)), None, CLASSES, TEMPLATE)
    assert zero_shot.image_to_text is not None
