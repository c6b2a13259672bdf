"""Many runs, one frozen trunk (DESIGN section 11), as torch modules.

Runs on one backbone identity share the image tower up to the earliest block any of them
adapts: the `Trunk` (pixels -> the tokens entering that block [B, T, W]; the pooled
features [B, D] when no run adapts inside the tower: GA-Net, the linear probe and
zero-shot act after pooling). Each run's branch is its own deploy form reading the trunk's
output in place of pixels (`AdaptedModel.input_block`): from there to its logits and
embeddings, the frozen blocks before its own first adapted block included (an HMMoE run
adapting the last 2 blocks beside one adapting the last 3 runs one frozen block itself).

LoRA adapts every block (`first_adapted_block()` is None): a trunk at the patch
embeddings would share almost nothing and pull every other run's branch back to the
whole tower, so a set with a LoRA run is refused; export it on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmdeploy.backbone import Backbone, identity_summary
from mmdeploy.errors import BackboneMismatchError, ConfigError

from .base import AdaptedModel


def refuse_other_backbones(identities: Mapping[str, dict]) -> None:
    """Raise `BackboneMismatchError` naming the first run (by name) whose backbone identity
    differs from the first run's."""
    (first, identity), *others = identities.items()
    for name, other in others:
        if other != identity:
            raise BackboneMismatchError(
                f"{name} (backbone {identity_summary(other)}) and {first} (backbone "
                f"{identity_summary(identity)}) were trained on different backbones: one trunk "
                "serves one backbone")


def trunk_block(models: Mapping[str, AdaptedModel]) -> int:
    """Where the shared trunk ends: the earliest first adapted block among `models` (the
    tower's depth, i.e. the pooled features, when none adapts inside it)."""
    refuse_other_backbones({name: m.backbone.identity for name, m in models.items()})
    blocks = {name: m.first_adapted_block() for name, m in models.items()}
    every = [name for name, block in blocks.items() if block is None]
    if every:
        raise ConfigError(f"{every[0]} adapts every block of the image tower (LoRA): it shares "
                          "no trunk with other runs; export it on its own")
    return min(blocks.values())


class _Tap(nn.Module):
    """Stands in for the trunk's last block + 1: keeps the tokens entering it (for
    `Trunk.forward` to return) and passes them on to the rest of the tower's forward."""

    def __init__(self, captured: list[torch.Tensor]):
        super().__init__()
        self.captured = captured

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.captured.append(hidden_states)
        return hidden_states


class Trunk(nn.Module):
    """pixel_values [B, 3, H, W] -> what the frozen tower makes of them up to `block`: the
    tokens entering it [B, T, W] (as `Backbone.vision_tokens`), or the pooled features
    [B, D] (as `Backbone.image_features`) when `block` is the tower's depth.

    Takes `backbone` for itself: its block list is cut to the blocks before `block` (their
    weights are all the trunk holds of the tower's blocks), followed by a tap that keeps the
    tokens entering `block`. The tower's own forward then runs unchanged (embeddings and
    any pre-norm as its checkpoint defines them), which exports; `vision_tokens` stops the
    forward with an exception, which torch.export cannot trace.
    """

    def __init__(self, backbone: Backbone, block: int):
        super().__init__()
        blocks = backbone.vision_blocks()
        if not 0 <= block <= len(blocks):
            raise ConfigError(f"trunk block {block}: the image tower has {len(blocks)} blocks")
        backbone.text = None  # the trunk runs no text tower
        self.backbone, self.block, self.pooled = backbone, block, block == len(blocks)
        self._captured: list[torch.Tensor] = []
        if not self.pooled:
            parent, name = next((module, name) for module in backbone.vision.modules()
                                for name, child in module.named_children() if child is blocks)
            setattr(parent, name, nn.ModuleList([*blocks[:block], _Tap(self._captured)]))
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.pooled:
            return self.backbone.image_features(pixel_values)
        self._captured.clear()
        self.backbone.vision(pixel_values=pixel_values)
        return self._captured.pop()


def as_branch(model: AdaptedModel, block: int) -> AdaptedModel:
    """`model` in its deploy form, reading a `Trunk(…, block)`'s output in place of pixels:
    trunk output -> (logits [B, C], embeddings [B, D]), its normal export's outputs."""
    first = model.first_adapted_block()
    if first is None or first < block:
        raise ConfigError(f"a branch of {type(model).__name__} cannot start at block {block}: "
                          f"it adapts block {first}")
    model.to_deploy()
    model.input_block = block
    return model

