"""The vqa models: the baselines over pooled features, LoRA on the towers, HMMoE reading the
question's tokens inside the image tower, GA-Net with the question as its nodes' text half.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmdeploy.backbone import Backbone

from ..baselines.model import LoRAModel
from ..ganet import graph
from ..ganet.model import GANetModel
from ..hmmoe.model import TEXT_LORA_TARGETS, HMMoEModel
from ..lora import attach_lora, merge_lora
from .base import VqaModel
from .config import (
    ImageOnlyConfig,
    LateFusionConfig,
    LateFusionMLPConfig,
    ProductFusionConfig,
    QuestionOnlyConfig,
    VqaLoRAConfig,
)
from .heads import MLPHead, ProductHead


class _MLPHeadModel(VqaModel):
    reads = "both"

    def build_head(self, backbone: Backbone, answers: int) -> nn.Module:
        return MLPHead(backbone.image_embed_dim, backbone.text_embed_dim, answers,
                       self.config.hidden, self.reads)


class QuestionOnlyModel(_MLPHeadModel):
    """The answer from the question alone: the prior a question's wording carries."""

    config_class = QuestionOnlyConfig
    reads = "question"


class ImageOnlyModel(_MLPHeadModel):
    """The answer from the image alone: it cannot answer yes/no questions."""

    config_class = ImageOnlyConfig
    reads = "image"


class LateFusionModel(_MLPHeadModel):
    """A linear probe on [image ; question]."""

    config_class = LateFusionConfig


class LateFusionMLPModel(_MLPHeadModel):
    """An MLP on [image ; question]."""

    config_class = LateFusionMLPConfig


class ProductFusionModel(VqaModel):
    """ReLU(W_i image) * ReLU(W_q question) -> linear: fusion by a product of pooled features."""

    config_class = ProductFusionConfig

    def build_head(self, backbone: Backbone, answers: int) -> nn.Module:
        return ProductHead(backbone.image_embed_dim, backbone.text_embed_dim, answers,
                           self.config.width)


class VqaLoRAModel(VqaModel):
    """LoRA on both towers' attention, under the product-fusion head."""

    config_class = VqaLoRAConfig

    @classmethod
    def fitted_defaults(cls, backbone: Backbone) -> dict[str, tuple[Any, str]]:
        return LoRAModel.fitted_defaults(backbone)

    def __init__(self, backbone: Backbone, config: VqaLoRAConfig, class_names: list[str],
                 prompt_template: str = "{}"):
        super().__init__(backbone, config, class_names, prompt_template)
        self.image_loras = attach_lora(backbone.vision, config.targets, config.rank,
                                       config.alpha)
        self.text_loras = attach_lora(backbone.text, TEXT_LORA_TARGETS, config.rank,
                                      config.alpha)

    def first_adapted_block(self) -> None:
        return None  # the targets are in every block

    def freeze_adapter(self) -> None:
        merge_lora(self.backbone.vision, self.image_loras)
        del self.image_loras


class VqaHMMoEModel(VqaModel, HMMoEModel):
    """HMMoE whose context at each adapted image block is the question: the text tower's
    token states at the matching depth, all tokens, with the attention mask (padding takes
    part in no expert and not in the router). The product-fusion head answers from the
    adapted image features and the pooled question."""

    image_reads_question = True

    def __init__(self, backbone: Backbone, config, class_names: list[str],
                 prompt_template: str = "{}"):
        super().__init__(backbone, config, class_names, prompt_template)
        self.uses_captions = False  # the question is the context; `context` is not read
        self._question: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def encode_image(self, pixel_values: torch.Tensor, states: tuple[torch.Tensor, ...],
                     attention_mask: torch.Tensor) -> torch.Tensor:
        # The hooks read the question's states while the image tower runs.
        self._question = ([states[depth] for depth in self.text_layers], attention_mask)
        try:
            return self.image_features(pixel_values)
        finally:
            self._question = None

    def context(self, position: int) -> torch.Tensor:
        """The question's token states at adapter `position`'s depth [B, T, text_width]."""
        if self._question is None:
            raise RuntimeError("a vqa HMMoE runs its image tower only with a question")
        return self._question[0][position]

    def context_mask(self, position: int) -> torch.Tensor:
        return self._question[1]

    def freeze_adapter(self) -> None:
        for adapter in self.adapters:
            adapter.deploy_form = True


class VqaGANetModel(VqaModel, GANetModel):
    """GA-Net whose nodes are [image ; question]; the answer nodes are [mean image of the
    training questions with that answer ; the answer's text]. Its own linear head answers
    from the adapted node."""

    uses_captions = False

    def build_head(self, backbone: Backbone, answers: int) -> None:
        return None  # GA-Net's `classifier` is its head

    def answer(self, image: torch.Tensor,
               question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nodes = self.adapt_nodes(graph.node_features(image, question))
        return self.classifier(nodes), nodes

    @torch.no_grad()
    def build_vqa_bank(self, image: torch.Tensor, question: torch.Tensor,
                       labels: torch.Tensor, seed: int) -> None:
        """The bank from the training questions' pooled image [N, Di] and question [N, Dt]
        features and answers [N]."""
        self.bank_from(image, question, labels.to(image.device), seed)

    def freeze_adapter(self) -> None:
        """Bake the bank side into constants: serving computes query rows only."""
        self.register_buffer("frozen_bank_messages",
                             self.adapter.bank_messages(self.bank_nodes,
                                                        self.bank_adjacency).detach(),
                             persistent=False)
