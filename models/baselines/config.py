"""Configs of the baselines the trainer compares adapters against."""

from dataclasses import dataclass

from mmdeploy.config import ConfigBase


@dataclass
class ZeroShotConfig(ConfigBase):
    """Nothing to set: class-prompt embeddings against frozen image embeddings."""


@dataclass
class LinearProbeConfig(ConfigBase):
    """A linear classifier on frozen image embeddings."""


@dataclass
class LoRAConfig(ConfigBase):
    """LoRA on the image tower's attention projections, with the scaled-cosine head."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "query", "value")
