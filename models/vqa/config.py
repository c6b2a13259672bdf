"""Configs of the vqa baselines (HMMoE and GA-Net keep their own)."""

from __future__ import annotations

from dataclasses import dataclass

from mmdeploy.config import ConfigBase
from mmdeploy.errors import ConfigError

from ..baselines.config import LoRAConfig


@dataclass
class HeadConfig(ConfigBase):
    """A head over pooled features: `hidden` = 0 is a linear probe, else one hidden ReLU layer
    of that width."""

    hidden: int = 512

    def __post_init__(self) -> None:
        if self.hidden < 0:
            raise ConfigError(f"{type(self).__name__}.hidden = {self.hidden}: must be >= 0")


@dataclass
class QuestionOnlyConfig(HeadConfig):
    """An MLP on the pooled question features alone (the image is ignored)."""


@dataclass
class ImageOnlyConfig(HeadConfig):
    """An MLP on the pooled image features alone (the question is ignored)."""


@dataclass
class LateFusionConfig(HeadConfig):
    """A linear probe on [image ; question] pooled features."""

    hidden: int = 0


@dataclass
class LateFusionMLPConfig(HeadConfig):
    """An MLP (one hidden layer) on [image ; question] pooled features."""


@dataclass
class ProductFusionConfig(ConfigBase):
    """ReLU(W_i image) * ReLU(W_q question), `width` wide, then a linear answer head."""

    width: int = 256

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ConfigError(f"ProductFusionConfig.width = {self.width}: must be >= 1")


@dataclass
class VqaLoRAConfig(LoRAConfig):
    """LoRA on both towers' attention (query and value), under the product-fusion head."""
