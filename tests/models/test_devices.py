"""Every tensor a model uses moves with it: moved to torch's `meta` device, no tensor is left
behind on the CPU (a stray one would break training and serving on a GPU, which the CPU
suite cannot run). The deploy form then runs its forward on meta inputs. (The training form's
forward cannot: transformers' text tower reads mask values with `.item()`, which meta
tensors refuse.)"""

from __future__ import annotations

import pytest
import torch

from mmdeploy.registry import ADAPTERS, adapter_class

CLASSES = ["cat", "dog", "bird"]


def tensors_off(model: torch.nn.Module, device: str) -> list[str]:
    """Every tensor a module holds (parameters, buffers, and plain attributes: a tensor, or
    one inside a dict, list or tuple) that is not on `device`, by where it was found."""
    found = []
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            if key == "_modules":
                continue
            items = (value.items() if isinstance(value, dict) else
                     enumerate(value) if isinstance(value, list | tuple) else [("", value)])
            for inner, item in items:
                if isinstance(item, torch.Tensor) and item.device.type != device:
                    found.append(f"{module_name or 'model'}.{key}[{inner}]".replace("[]", ""))
    return found


def adapted(backbone_factory, adapter: str):
    backbone = backbone_factory()
    cls = adapter_class(adapter)
    model = cls(backbone, cls.config_class(), CLASSES, "a photo of a {}.")
    if model.needs_bank:
        height, width = backbone.preprocessor.image_size
        model.build_bank(torch.randn(6, 3, height, width), torch.tensor([0, 1, 2] * 2),
                         [""] * 6, seed=0)
    return model.eval()


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_every_tensor_moves_with_the_model(backbone_factory, adapter):
    model = adapted(backbone_factory, adapter)
    model.class_embeddings()  # fills the prompt cache on the CPU
    model.to("meta")
    assert tensors_off(model, "meta") == []


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_the_deploy_form_runs_on_the_device_it_was_moved_to(backbone_factory, adapter):
    model = adapted(backbone_factory, adapter).to_deploy().to("meta")
    assert tensors_off(model, "meta") == []
    height, width = model.backbone.preprocessor.image_size
    logits, embeddings = model(torch.randn(2, 3, height, width, device="meta"))
    assert logits.device.type == embeddings.device.type == "meta"
    assert tuple(logits.shape) == (2, len(CLASSES))


def test_the_check_finds_a_stray_tensor(backbone_factory):
    """The prompt tokens as a plain dict (how they were kept before) are found."""
    model = adapted(backbone_factory, "zero-shot")
    model.stray_tokens = {"input_ids": model.prompt_input_ids.clone()}
    model.to("meta")
    assert tensors_off(model, "meta") == ["model.stray_tokens[input_ids]"]
