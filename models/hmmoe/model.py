"""HMMoE attached to a frozen image tower.

In each of the last L blocks the adapter runs in parallel with the FFN:
    y = x + attn(ln1(x));  y = y + ffn(ln2(y)) + s * HMMoE(ln2(y), context_l)
implemented as a forward hook on the block's `mlp` (its input is ln2(y)), so the backbone's
modules and checkpoint keys are untouched.

context_l is the text side at the same relative depth: hidden states after text block
round((l + 1) * N_text / N_image), mean-pooled over their tokens. With `context="prompts"`
there is one context token per class prompt; they depend only on the label set, so
`to_deploy` bakes them in as constant buffers and the exported graph runs no text tower.
With `context="captions"` the one context token is the sample's caption; a sample without
one has the empty caption, and that constant is what the export bakes in (serving takes
images alone).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from mmdeploy.backbone import Backbone

from ..base import AdaptedModel
from ..lora import attach_lora
from .config import HMMoEConfig
from .layer import HMMoELayer

TEXT_LORA_TARGETS = ("q_proj", "v_proj", "query", "value")


class HMMoEModel(AdaptedModel):
    config_class = HMMoEConfig

    @classmethod
    def fitted_defaults(cls, backbone: Backbone) -> dict[str, tuple[Any, str]]:
        depth = len(backbone.vision_blocks())
        return {"num_layers": (min(HMMoEConfig.num_layers, depth),
                               f"is more than the image tower's {depth} blocks")}

    def __init__(self, backbone: Backbone, config: HMMoEConfig, class_names: list[str],
                 prompt_template: str):
        super().__init__(backbone, config, class_names, prompt_template)
        blocks = backbone.vision_blocks()
        if not 1 <= config.num_layers <= len(blocks):
            raise ValueError(f"num_layers must be 1..{len(blocks)} for this image tower")
        if not all(hasattr(block, "mlp") for block in blocks):
            raise ValueError(f"{type(blocks[0]).__name__} has no `mlp` to run HMMoE beside")
        image_depth, text_depth = len(blocks), len(backbone.text_blocks())
        self.image_layers = list(range(image_depth - config.num_layers, image_depth))
        # hidden_states[0] is the embedding output, so block j's output is index j + 1.
        self.text_layers = [max(1, round((i + 1) * text_depth / image_depth))
                            for i in self.image_layers]
        self.adapters = nn.ModuleList(
            HMMoELayer(backbone.vision_width, backbone.text_width, config)
            for _ in self.image_layers)
        for position, index in enumerate(self.image_layers):
            blocks[index].mlp.register_forward_hook(functools.partial(self._run_adapter, position))
        if config.text_lora_rank > 0:
            self.text_loras = attach_lora(backbone.text, TEXT_LORA_TARGETS,
                                          config.text_lora_rank, config.text_lora_alpha)
        self.uses_captions = config.context == "captions"
        self._caption_context: list[torch.Tensor] | None = None

    def _run_adapter(self, position: int, mlp: nn.Module, inputs: tuple,
                     output: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[position]
        return output + self.config.scale * adapter(inputs[0], self.context(position),
                                                    self.context_mask(position))

    def context_mask(self, position: int) -> torch.Tensor | None:
        """Which of `context(position)`'s tokens are real: None, all of them (the pooled
        prompts or captions); a vqa model's question tokens carry their attention mask."""
        return None

    def context(self, position: int) -> torch.Tensor:
        """Context tokens for adapter `position`: [1, C, text_width] from the class prompts,
        or [B, 1, text_width] from the batch's captions."""
        if self.deployed:
            return getattr(self, f"frozen_context_{position}")
        if self._caption_context is not None:
            return self._caption_context[position]
        _, hidden_states = self.encode_prompts()
        return self._pool(hidden_states, self.prompt_tokens, position).unsqueeze(0)

    def _pool(self, hidden_states: tuple, tokens: dict, position: int) -> torch.Tensor:
        """Token-mean of the text states at adapter `position`'s depth: [n, text_width]."""
        states = hidden_states[self.text_layers[position]]
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1)

    def caption_context(self, captions: list[str]) -> list[torch.Tensor]:
        """One context token per caption, per adapter: [B, 1, text_width] each."""
        tokens = self.backbone.tokenize(captions)
        _, hidden_states = self.backbone.encode_text(tokens)
        return [self._pool(hidden_states, tokens, position).unsqueeze(1)
                for position in range(len(self.adapters))]

    def encode_images(self, pixel_values: torch.Tensor,
                      captions: list[str] | None = None) -> torch.Tensor:
        if not self.uses_captions or self.deployed:
            return self.image_features(pixel_values)
        # The hooks read the captions' context while the image tower runs.
        self._caption_context = self.caption_context(captions or [""] * len(pixel_values))
        try:
            return self.image_features(pixel_values)
        finally:
            self._caption_context = None

    def first_adapted_block(self) -> int:
        return self.image_layers[0]

    def auxiliary_loss(self) -> torch.Tensor:
        """The routers' load-balancing losses (each already weighted by its config)."""
        return sum(adapter.aux_loss for adapter in self.adapters)

    def freeze_adapter(self) -> None:
        empty_caption = self.caption_context([""]) if self.uses_captions else None
        for position, adapter in enumerate(self.adapters):
            context = empty_caption[position] if empty_caption else self.context(position)
            self.register_buffer(f"frozen_context_{position}", context.detach(),
                                 persistent=False)
            adapter.deploy_form = True
