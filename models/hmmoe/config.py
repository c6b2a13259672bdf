"""HMMoE adapter options, validated on construction (and so on `from_dict`)."""

from __future__ import annotations

from dataclasses import dataclass

from mmdeploy.config import ConfigBase
from mmdeploy.errors import ConfigError

from .experts import EXPERTS
from .router import GRANULARITIES

CONTEXTS = ("prompts", "captions")


@dataclass
class HMMoEConfig(ConfigBase):
    """One HMMoE layer beside the FFN of each of the last `num_layers` image-tower blocks.

    `top_k` == len(experts) means dense gating. `router_noise` is the std of the Gaussian noise
    on the router logits in training. `scale` is s in y = y + ffn(ln(y)) + s * HMMoE(ln(y), ctx):
    4, because the top-k gate and the experts' own sigmoids shrink each step's change to a
    fraction of LoRA's (whose gain is alpha / rank); on the real pair at 16 shots, 3 seeds:
    80.3 ± 2.1% against 77.2 ± 1.3% at s = 1 (docs/learning.md).
    `text_lora_rank` = 0 leaves the text tower without LoRA. `context` is "prompts" (one
    context token per class prompt) or "captions" (one token: the sample's caption, the empty
    caption when it has none, as serving images alone does).
    """

    rank: int = 16
    num_layers: int = 4
    experts: tuple[str, ...] = (
        "bottleneck",
        "cross_attention",
        "channel_attention",
        "affine_fusion",
    )
    top_k: int = 2
    router: str = "sample"
    router_noise: float = 1.0
    balance_loss_weight: float = 0.01
    scale: float = 4.0
    text_lora_rank: int = 0
    text_lora_alpha: float = 16.0
    context: str = "prompts"

    def __post_init__(self) -> None:
        self.experts = tuple(self.experts)
        unknown = [name for name in self.experts if name not in EXPERTS]
        if unknown:
            raise ConfigError(
                f"HMMoEConfig.experts: unknown expert {unknown[0]!r} "
                f"(choose from {', '.join(EXPERTS)})"
            )
        if not self.experts:
            raise ConfigError("HMMoEConfig.experts: at least one expert is needed")
        if not 1 <= self.top_k <= len(self.experts):
            raise ConfigError(
                f"HMMoEConfig.top_k = {self.top_k}: must be between 1 and the number of experts "
                f"({len(self.experts)})"
            )
        if self.context not in CONTEXTS:
            raise ConfigError(
                f"HMMoEConfig.context = {self.context!r}: must be one of {', '.join(CONTEXTS)}"
            )
        if self.router not in GRANULARITIES:
            raise ConfigError(
                f"HMMoEConfig.router = {self.router!r}: must be one of {', '.join(GRANULARITIES)}"
            )
        for name in ("rank", "num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HMMoEConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("router_noise", "balance_loss_weight", "text_lora_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"HMMoEConfig.{name} = {getattr(self, name)}: must be >= 0")
