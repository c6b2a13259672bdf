"""What every vqa model shares: the question through the text tower (cached per distinct
question while the tower is frozen), the image through the image tower, an answer head.

`forward(pixel_values, input_ids, attention_mask)` -> (logits [B, A], embeddings [B, H]): the
question is token ids and their mask [B, T], as the run's tokenizer makes them (the form the
two-input export takes: the text tower stays in the graph). The answers are the run's
`class_names`; the answer head is learned (`heads`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import torch
from torch import nn

from mmdeploy.backbone import Backbone
from mmdeploy.config import ConfigBase

from ..base import AdaptedModel
from .heads import ProductHead

FUSION_WIDTH = 256  # the product head under the adapters (LoRA, HMMoE): ProductFusionConfig's

QuestionStates = tuple[torch.Tensor, tuple[torch.Tensor, ...]]
QUESTION_CACHE_BYTES = 512 * 2**20
"""The question cache's budget: easy-VQA's 107 questions take a few MB, but a manifest of
free-form questions is mostly distinct ones, whose states at every depth would otherwise
grow without bound; the least recently used are dropped (and recomputed if asked again)."""


class VqaModel(AdaptedModel):
    """The base of the vqa models: override `build_head`, `encode_image` or `answer`."""

    task: ClassVar[str] = "vqa"
    uses_cosine_head = False
    # True when the image features depend on the question (HMMoE reads it inside the tower);
    # else evaluation embeds each image once for all the questions asked of it.
    image_reads_question: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, config: ConfigBase, class_names: list[str],
                 prompt_template: str = "{}"):
        # The "prompts" of a vqa model are the answers themselves (GA-Net's answer nodes).
        super().__init__(backbone, config, class_names, "{}")
        self._question_cache: OrderedDict[tuple[int, ...], QuestionStates] = OrderedDict()
        self._question_cache_bytes = 0
        self.fusion = self.build_head(backbone, len(class_names))

    def build_head(self, backbone: Backbone, answers: int) -> nn.Module | None:
        return ProductHead(backbone.image_embed_dim, backbone.text_embed_dim, answers,
                           FUSION_WIDTH)

    # -- the question ----------------------------------------------------------------------
    def encode_question(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> QuestionStates:
        """Pooled question features [B, Dt] and the text tower's states at every depth
        ([B, T, W] each, the embeddings first); padded positions hold zeros when cached.

        While the text tower is frozen and the model is not deployed, each distinct
        question (its unpadded token ids) goes through the tower once; a text-tower LoRA (it
        may be training) and the deploy form (it exports) run the tower every time. From the
        cache, a model whose image tower does not read the question gets no states (`()`):
        keeping and padding them made a product-fusion training step 5-6 ms instead of 3."""
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.deployed or self.text_loras is not None:
            return self.backbone.encode_text(tokens)
        real = attention_mask.bool()
        keys = [tuple(i for i, keep in zip(row, kept, strict=True) if keep)
                for row, kept in zip(input_ids.tolist(), real.tolist(), strict=True)]
        missing = {key: row for row, key in enumerate(keys) if key not in self._question_cache}
        if missing:
            rows = torch.tensor(list(missing.values()), device=input_ids.device)
            with torch.no_grad():
                pooled, states = self.backbone.encode_text(
                    {name: tensor[rows] for name, tensor in tokens.items()})
            for j, (key, row) in enumerate(missing.items()):
                kept = tuple(s[j, real[row]] for s in states) if self.image_reads_question \
                    else ()
                entry = (pooled[j], kept)
                self._question_cache[key] = entry
                self._question_cache_bytes += _entry_bytes(entry)
        cached = [self._question_cache[key] for key in keys]
        self._evict_questions(set(keys))
        pooled = torch.stack([c[0] for c in cached])
        if not self.image_reads_question:
            return pooled, ()
        states = []
        for depth, first in enumerate(cached[0][1]):
            padded = first.new_zeros((*input_ids.shape, first.shape[-1]))
            padded[real] = torch.cat([c[1][depth] for c in cached])
            states.append(padded)
        return pooled, tuple(states)

    def _evict_questions(self, in_use: set[tuple[int, ...]]) -> None:
        """Mark this batch's questions as recently used, then drop the least recently used
        others until the cache fits `QUESTION_CACHE_BYTES` (a batch's own questions stay:
        the cache may exceed its budget by one batch)."""
        for key in in_use:
            self._question_cache.move_to_end(key)
        while self._question_cache_bytes > QUESTION_CACHE_BYTES and \
                len(self._question_cache) > len(in_use):
            self._question_cache_bytes -= _entry_bytes(self._question_cache.popitem(last=False)[1])

    def clear_caches(self) -> None:
        super().clear_caches()
        self._question_cache = OrderedDict()
        self._question_cache_bytes = 0

    # -- the forward pass ------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: pixel_values [B, 3, H, W] (or the cached frozen features), input_ids and
        attention_mask [B, T] -> logits [B, A], embeddings [B, H]."""
        pooled, states = self.encode_question(input_ids, attention_mask)
        image = self.encode_image(pixel_values, states, attention_mask)
        return self.answer(image, pooled)

    def encode_image(self, pixel_values: torch.Tensor, states: tuple[torch.Tensor, ...],
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled image features [B, Di]; the question's states are there for adapters that
        read the question inside the image tower."""
        return self.image_features(pixel_values)

    def answer(self, image: torch.Tensor,
               question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image [B, Di] and question [B, Dt] features -> logits, embeddings."""
        return self.fusion(image, question)

    @torch.no_grad()
    def to_deploy(self) -> VqaModel:
        """The form that exports: adapters switched to it, LoRA merged; the text tower stays
        (every question is new at serving time)."""
        from ..lora import merge_lora

        self.eval()
        self.freeze_adapter()
        if self.text_loras is not None:
            merge_lora(self.backbone.text, self.text_loras)
            self.text_loras = None
        self.clear_caches()
        self.deployed = True
        return self


def _entry_bytes(entry: QuestionStates) -> int:
    pooled, states = entry
    return sum(t.numel() * t.element_size() for t in (pooled, *states))
