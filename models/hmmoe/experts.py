"""The four heterogeneous low-rank experts of an HMMoE layer.

Every expert maps image tokens `x` [B, N, d] (already layer-normed by the block) and the text
context `ctx` [B or 1, T, d] (already projected to width d; batch 1 broadcasts over B) to
[B, N, d]. Each works at rank r and zero-initialises its output projection `up`, so every expert
outputs exactly 0 before training.

An expert runs in two steps, so that a token router can send single tokens to it and still get
the same numbers as the dense form: `condition(x, ctx, mask)` computes per-sample state from the
whole sample (pooled image, context keys), then `map_tokens(tokens, state)` maps tokens
independently given that state. `forward(x, ctx, mask)` chains the two.

`mask` [B or 1, T] (1 = a real context token, 0 = padding), or None when every context token
is real (the class prompts' pooled tokens): padding then takes no part anywhere, so a padded
question gives what the unpadded one gives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = tuple[Tensor, ...]
"""Per-sample expert state: tensors with a leading batch dim of B or 1 (broadcast)."""

PADDING_SCORE = -1e4
"""Attention score given to padding tokens: exp underflows to exactly 0, also in fp16."""


def masked_mean(ctx: Tensor, mask: Tensor | None, keepdim: bool = False) -> Tensor:
    """Mean over the context tokens [B, T, d] -> [B, d] (or [B, 1, d]), padding excluded."""
    if mask is None:
        return ctx.mean(dim=1, keepdim=keepdim)
    weights = mask.unsqueeze(-1).to(ctx.dtype)
    return (ctx * weights).sum(1, keepdim=keepdim) / weights.sum(1, keepdim=keepdim).clamp(min=1)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer with zero weight and bias, so the expert starts as an exact no-op."""
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Expert(nn.Module, ABC):
    """Base of the experts: `forward(x, ctx) = map_tokens(x, condition(x, ctx))`.

    Shapes:
        x [B, N, d], ctx [B or 1, T, d] -> [B, N, d]
        condition: x, ctx -> state, each tensor [B or 1, ...]
        map_tokens: tokens [B', n, d], state (batch B' or 1) -> [B', n, d]
    """

    up: nn.Linear

    def condition(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> State:
        return ()

    @abstractmethod
    def map_tokens(self, tokens: Tensor, state: State) -> Tensor:
        """The expert's low-rank map of `tokens`, conditioned by `state`."""

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.map_tokens(x, self.condition(x, ctx, mask))


class BottleneckExpert(Expert):
    """Image-only bottleneck adapter: up(GELU(down(x))); ignores the context.

    Shapes:
        x [B, N, d], ctx (unused) -> [B, N, d]; hidden [B, N, r]
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = zero_linear(rank, dim)

    def map_tokens(self, tokens: Tensor, state: State) -> Tensor:
        return self.up(F.gelu(self.down(tokens)))


class CrossAttentionExpert(Expert):
    """Low-rank cross-attention from image tokens to context tokens.

    softmax(x Wq (ctx Wk)^T / sqrt(r)) (ctx Wv) Wo, with Wq, Wk, Wv: d -> r and Wo = `up`: r -> d.
    Written as plain matmuls (export-friendly; the batch dim of a batch-1 context broadcasts).

    Shapes:
        x [B, N, d], ctx [B or 1, T, d] -> [B, N, d]
        state: keys, values [B or 1, T, r]; scores [B, N, T]
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.query = nn.Linear(dim, rank, bias=False)
        self.key = nn.Linear(dim, rank, bias=False)
        self.value = nn.Linear(dim, rank, bias=False)
        self.up = zero_linear(rank, dim)
        self.scale = rank**-0.5

    def condition(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> State:
        if mask is None:
            return self.key(ctx), self.value(ctx)
        # [B, 1, T]: 0 for a real token, PADDING_SCORE for padding, added to the scores
        bias = (1 - mask.to(ctx.dtype)).unsqueeze(1) * PADDING_SCORE
        return self.key(ctx), self.value(ctx), bias

    def map_tokens(self, tokens: Tensor, state: State) -> Tensor:
        keys, values, *bias = state
        scores = self.query(tokens) @ keys.transpose(-1, -2) * self.scale
        if bias:
            scores = scores + bias[0]
        return self.up(scores.softmax(dim=-1) @ values)


class ChannelAttentionExpert(Expert):
    """Bottleneck whose r channels are gated SE-style from the pooled image and context.

    g = sigmoid(W2 relu(W1 [mean_N(x) ; mean_T(ctx)])) in R^r; output up(g * down(x)).
    W1 on the concatenation is written as two linears (`squeeze_image` + `squeeze_context`),
    so a batch-1 context broadcasts without an expand.

    Shapes:
        x [B, N, d], ctx [B or 1, T, d] -> [B, N, d]
        state: gate [B, 1, r]
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.squeeze_image = nn.Linear(dim, rank)
        self.squeeze_context = nn.Linear(dim, rank, bias=False)
        self.excite = nn.Linear(rank, rank)
        self.down = nn.Linear(dim, rank)
        self.up = zero_linear(rank, dim)

    def condition(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> State:
        pooled = F.relu(self.squeeze_image(x.mean(dim=1))
                        + self.squeeze_context(masked_mean(ctx, mask)))
        return (torch.sigmoid(self.excite(pooled)).unsqueeze(1),)

    def map_tokens(self, tokens: Tensor, state: State) -> Tensor:
        (gate,) = state
        return self.up(gate * self.down(tokens))


class AffineFusionExpert(Expert):
    """FiLM of the image projection by the pooled context, in the rank-r space.

    z = x A, c = mean_T(ctx) A_c, z' = (1 + gamma(c)) * z + beta(c), output z' B,
    with A = `down`, A_c = `context_down` (d -> r), gamma, beta (r -> r), B = `up` (r -> d).

    Shapes:
        x [B, N, d], ctx [B or 1, T, d] -> [B, N, d]
        state: scale (1 + gamma), shift (beta) [B or 1, 1, r]
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.context_down = nn.Linear(dim, rank, bias=False)
        self.gamma = nn.Linear(rank, rank)
        self.beta = nn.Linear(rank, rank)
        self.up = zero_linear(rank, dim)

    def condition(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> State:
        context = self.context_down(masked_mean(ctx, mask, keepdim=True))
        return 1 + self.gamma(context), self.beta(context)

    def map_tokens(self, tokens: Tensor, state: State) -> Tensor:
        scale, shift = state
        return self.up(scale * self.down(tokens) + shift)


EXPERTS: dict[str, type[Expert]] = {
    "bottleneck": BottleneckExpert,
    "cross_attention": CrossAttentionExpert,
    "channel_attention": ChannelAttentionExpert,
    "affine_fusion": AffineFusionExpert,
}
"""Expert types by the name used in `HMMoEConfig.experts`."""
