"""Baselines in the same trainer and export path as the adapters, for honest comparison."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmdeploy.backbone import Backbone

from ..base import AdaptedModel
from ..lora import attach_lora, merge_lora
from .config import LinearProbeConfig, LoRAConfig, ZeroShotConfig


class ZeroShotModel(AdaptedModel):
    """The frozen backbone's own zero-shot classifier: nothing trains."""

    config_class = ZeroShotConfig

    def __init__(self, backbone: Backbone, config: ZeroShotConfig, class_names: list[str],
                 prompt_template: str):
        super().__init__(backbone, config, class_names, prompt_template)
        self.logit_scale.requires_grad_(False)


class LinearProbeModel(AdaptedModel):
    """Shapes: pixel_values [B, 3, H, W] -> frozen embedding [B, D] -> Linear -> logits [B, C]."""

    config_class = LinearProbeConfig
    uses_cosine_head = False

    def __init__(self, backbone: Backbone, config: LinearProbeConfig, class_names: list[str],
                 prompt_template: str):
        super().__init__(backbone, config, class_names, prompt_template)
        self.classifier = nn.Linear(backbone.image_embed_dim, len(class_names))

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(embeddings)


class LoRAModel(AdaptedModel):
    """LoRA on the image tower's attention; merged into the frozen weights for export."""

    config_class = LoRAConfig

    @classmethod
    def fitted_defaults(cls, backbone: Backbone) -> dict[str, tuple[Any, str]]:
        """The default targets (the attention's query and value in CLIP and BERT-style
        towers) when the tower has any of them; else the Linear layers of its attention
        modules (a fused `qkv`, say)."""
        linears = {name.split(".")[-1]: name for name, module in backbone.vision.named_modules()
                   if isinstance(module, nn.Linear)}
        if any(target in linears for target in LoRAConfig.targets):
            return {}
        attention = tuple(sorted(last for last, name in linears.items()
                                 if "attn" in name or "attention" in name))
        return {"targets": (attention, "names no Linear layer of this image tower")}

    def __init__(self, backbone: Backbone, config: LoRAConfig, class_names: list[str],
                 prompt_template: str):
        super().__init__(backbone, config, class_names, prompt_template)
        self.image_loras = attach_lora(backbone.vision, config.targets, config.rank, config.alpha)

    def first_adapted_block(self) -> None:
        return None  # the targets are in every block

    def freeze_adapter(self) -> None:
        merge_lora(self.backbone.vision, self.image_loras)
        del self.image_loras
