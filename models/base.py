"""What every adapter shares: the frozen backbone, the class prompts, the head, and the
switch from the training form to the deploy form.

An adapter subclasses `AdaptedModel`, declares its `config_class`, and changes what it
needs: `encode_images` (through hooks on the towers, or by overriding it), `head`,
`freeze_adapter`, `auxiliary_loss`. `forward` returns `(logits, embeddings)` in both
forms; `to_deploy()` turns the model, in place, into the form that exports: text-side
results become constant buffers (so serving runs no text tower), LoRA weights are merged,
and adapters switch to their export-friendly form.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmdeploy.backbone import Backbone
from mmdeploy.config import ConfigBase


class AdaptedModel(nn.Module):
    config_class: ClassVar[type[ConfigBase]]
    uses_cosine_head: ClassVar[bool] = True
    uses_captions: bool = False  # True: `forward` takes per-sample captions ("" when missing)
    # True: the model keeps a memory bank built from the training split by
    # `build_bank(pixels, labels, captions, seed)`, saved with `bank_state_dict()` as the
    # run's `adapter_bank.safetensors` and restored with `load_bank_state_dict()`.
    needs_bank: ClassVar[bool] = False
    # True while the trainer feeds `frozen_features(pixels)` in place of pixels (its cache of
    # what the frozen part of the image tower makes of each image).
    reads_cache: bool = False
    # Set on a branch of a shared trunk (`models.shared`): `forward` takes what the frozen
    # tower makes of pixels up to this block (the tokens entering it; the pooled features at
    # the tower's depth), which may lie before `first_adapted_block()`.
    input_block: int | None = None

    def __init__(self, backbone: Backbone, config: ConfigBase, class_names: list[str],
                 prompt_template: str):
        super().__init__()
        if getattr(backbone, "adapted_by", None) is not None:
            # Adapters hook into the towers' modules: two models on one backbone would both run.
            raise ValueError("this backbone already carries an adapter; load a fresh one")
        backbone.adapted_by = type(self).__name__
        self.backbone = backbone
        self.config = config
        self.class_names = list(class_names)
        self.prompts = [prompt_template.format(name) for name in self.class_names]
        # Buffers, so that `.to(device)` moves them with the model (not saved: rebuilt here).
        tokens = backbone.tokenize(self.prompts)
        self.register_buffer("prompt_input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("prompt_attention_mask", tokens["attention_mask"], persistent=False)
        self._prompt_cache: tuple | None = None
        self.deployed = False
        self.text_loras: nn.ModuleDict | None = None
        if self.uses_cosine_head:
            self.logit_scale = nn.Parameter(torch.tensor(float(backbone.logit_scale_init)))
            self.image_to_text = (None if backbone.shared_space else
                                  nn.Linear(backbone.image_embed_dim, backbone.text_embed_dim))

    @classmethod
    def fitted_defaults(cls, backbone: Backbone) -> dict[str, tuple[Any, str]]:
        """For each option whose default depends on the backbone: the default fitted to
        `backbone` and why (e.g. clamped to its depth). None by default."""
        return {}

    @classmethod
    def fit_options(cls, backbone: Backbone,
                    typed: dict[str, Any]) -> tuple[ConfigBase, list[str]]:
        """The adapter's config on `backbone`: the options the user typed as they are (an
        unfitting one is refused when the model is built), every other at its default fitted
        to the tower; and one note for each default changed."""
        defaults = cls.config_class()
        values, notes = dict(typed), []
        for name, (fitted, reason) in cls.fitted_defaults(backbone).items():
            default = getattr(defaults, name)
            if name not in typed and fitted != default:
                values[name] = fitted
                notes.append(f"{name} = {fitted} (the default {default} {reason})")
        return cls.config_class.from_dict(values), notes

    # -- implemented by each adapter -------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor,
                      captions: list[str] | None = None) -> torch.Tensor:
        """Image embeddings [B, D] before normalisation (default: the frozen tower's own)."""
        return self.image_features(pixel_values)

    def first_adapted_block(self) -> int | None:
        """The first image-tower block the adapter changes: the tower's depth when it
        changes none (it acts on pooled features), None when nothing before it is frozen.
        Everything ahead of it is computed once per image by the trainer's cache."""
        return len(self.backbone.vision_blocks())

    # -- the frozen prefix, cached -----------------------------------------------------------
    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the frozen prefix of the image tower makes of `pixel_values`: the pooled
        features [B, D] when the adapter acts after pooling, else the tokens entering the
        first adapted block [B, T, W]."""
        block = self.first_adapted_block()
        if block is None:
            raise ValueError(f"{type(self).__name__} adapts the first image block: nothing "
                             "frozen to cache")
        if block == len(self.backbone.vision_blocks()):
            return self.backbone.image_features(pixel_values)
        return self.backbone.vision_tokens(pixel_values, block)

    def image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features [B, D] (with the adapter's hooks) for pixels,
        or, while `reads_cache`, for what `frozen_features` made of them, or, with
        `input_block` set, for what the tower made of them up to that block."""
        block = self.input_block
        if block is None and self.reads_cache:
            block = self.first_adapted_block()
        if block is None:
            return self.backbone.image_features(inputs)
        if block == len(self.backbone.vision_blocks()):
            return inputs
        return self.backbone.image_features_from(inputs, block)

    def freeze_adapter(self) -> None:
        """Adapter-specific part of `to_deploy` (bake constants, switch forms)."""

    def auxiliary_loss(self) -> torch.Tensor:
        """Training-only loss terms of the adapter (e.g. MoE load balancing)."""
        return torch.zeros(())

    # -- shared ----------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor,
                captions: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes: pixel_values [B, 3, H, W] -> logits [B, C], embeddings [B, D] (unit norm).

        `captions` (B strings) are used by adapters with `uses_captions`, ignored by others.
        """
        embeddings = self.encode_images(pixel_values, captions)
        if self.uses_cosine_head and self.image_to_text is not None:
            embeddings = self.image_to_text(embeddings)
        embeddings = F.normalize(embeddings, dim=-1)
        return self.head(embeddings), embeddings

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        """CLIP-style scaled cosine against the class-prompt embeddings."""
        return self.logit_scale.exp() * embeddings @ self.class_embeddings().T

    def class_embeddings(self) -> torch.Tensor:
        """Unit-norm class-prompt embeddings [C, D]; a constant buffer once deployed."""
        if self.deployed:
            return self.frozen_class_embeddings
        pooled, _ = self.encode_prompts()
        return F.normalize(pooled, dim=-1)

    @property
    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        """The class prompts as the text tower takes them."""
        return {"input_ids": self.prompt_input_ids, "attention_mask": self.prompt_attention_mask}

    def clear_caches(self) -> None:
        """Forget what was computed from the frozen towers (recomputed when next needed)."""
        self._prompt_cache = None

    def _apply(self, fn, *args, **kwargs):
        """Moving the model (`.to`, `.cuda`, `.half`) moves its parameters and buffers; the
        caches, computed on the old device, are dropped."""
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def encode_prompts(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Pooled prompt features [C, D] and the text tower's hidden states, per block.

        Recomputed on every call while a text-tower LoRA is attached (it may be training);
        cached otherwise, since the frozen tower gives the same answer every time.
        """
        if self._prompt_cache is not None:
            return self._prompt_cache
        grad = self.text_loras is not None and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            result = self.backbone.encode_text(self.prompt_tokens)
        if self.text_loras is None:
            self._prompt_cache = result
        return result

    @torch.no_grad()
    def to_deploy(self) -> AdaptedModel:
        """Turn this model, in place, into its deploy form and return it (in eval mode)."""
        from .lora import merge_lora

        self.eval()
        if self.uses_cosine_head:
            self.register_buffer("frozen_class_embeddings", self.class_embeddings().detach(),
                                 persistent=False)
        self.freeze_adapter()
        if self.text_loras is not None:
            merge_lora(self.backbone.text, self.text_loras)
            self.text_loras = None
        self.clear_caches()
        self.backbone.text = None  # serving runs no text tower
        self.deployed = True
        return self

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only: what `adapter_model.safetensors` holds."""
        return {name: p.detach().contiguous() for name, p in self.named_parameters()
                if p.requires_grad}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"adapter weights do not fit this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                if params[name].shape != tensor.shape:
                    raise KeyError(f"{name}: shape {tuple(tensor.shape)}, model expects "
                                   f"{tuple(params[name].shape)}")
                params[name].copy_(tensor)

    def parameter_report(self) -> dict[str, float]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        backbone = self.backbone.num_parameters()
        return {"trainable": trainable, "backbone": backbone,
                "trainable_share": trainable / backbone}
