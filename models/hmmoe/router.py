"""The HMMoE router: noisy top-k softmax over experts from pooled image and context.

It gives the same gates in two forms: `top_k_gates` (top-k values and expert ids, for sparse
dispatch in training) and `masked_gates` (a dense [.., E] gate vector masked by comparison with
the k-th largest logit: TopK with a constant K, no NonZero or scatter, for export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdeploy.errors import ConfigError

from .experts import masked_mean

GRANULARITIES = ("sample", "token")
"""Route whole samples (pooled image tokens) or single tokens."""

MASKED_LOGIT = -1e4
"""Logit given to experts outside the top k: exp underflows to exactly 0, also in fp16."""


class Router(nn.Module):
    """Logits W [image ; mean_T(ctx)] + b, with image = mean_N(x) ("sample") or x_t ("token").

    W on the concatenation is written as two linears (`image_logits` + `context_logits`), so a
    batch-1 context broadcasts without an expand. Gaussian noise (std `noise_std`) is added to
    the logits in training mode only.

    Shapes:
        x [B, N, d], ctx [B or 1, T, d] -> logits [B, E] ("sample") or [B, N, E] ("token")
        top_k_gates: logits [..., E] -> gates [..., k], expert ids [..., k]
        masked_gates: logits [..., E] -> gates [..., E], zero outside the top k
        balance_loss: logits [..., E] -> scalar
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, granularity: str, noise_std: float):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"router granularity {granularity!r} is not one of {GRANULARITIES}")
        self.num_experts, self.top_k = num_experts, top_k
        self.granularity, self.noise_std = granularity, noise_std
        self.image_logits = nn.Linear(dim, num_experts)
        self.context_logits = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask` [B or 1, T]: which context tokens are real (None: all)."""
        per_token = self.granularity == "token"
        image = x if per_token else x.mean(dim=1)
        context = masked_mean(ctx, mask, keepdim=per_token)
        logits = self.image_logits(image) + self.context_logits(context)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits

    def top_k_gates(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax over the k largest logits, and which experts they belong to."""
        values, expert_ids = logits.topk(self.top_k, dim=-1)
        return values.softmax(dim=-1), expert_ids

    def masked_gates(self, logits: Tensor) -> Tensor:
        """The same gates as `top_k_gates`, dense over experts: 0 outside the top k."""
        if self.top_k < self.num_experts:
            kth_largest = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth_largest, MASKED_LOGIT)
        return logits.softmax(dim=-1)

    def balance_loss(self, logits: Tensor) -> Tensor:
        """Switch load-balancing loss E * sum_e f_e * P_e (1 when perfectly balanced).

        f_e: share of routed samples/tokens whose top k includes e, divided by k;
        P_e: mean softmax probability of e over all experts (before top-k).
        """
        chosen = F.one_hot(logits.topk(self.top_k, dim=-1).indices, self.num_experts)
        fraction = chosen.sum(dim=-2).reshape(-1, self.num_experts).float().mean(dim=0)
        probability = logits.softmax(dim=-1).reshape(-1, self.num_experts).mean(dim=0)
        return self.num_experts * (fraction / self.top_k * probability).sum()
