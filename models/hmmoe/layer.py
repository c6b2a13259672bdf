"""One HMMoE layer: context projection, router and heterogeneous experts, in two forms.

- dispatch form (default, training): top-k expert ids; each expert runs only on the samples
  (or tokens) routed to it, and its gated output is added back with `index_add`.
- deploy form (`deploy_form = True`, export): every expert runs on every input and the gates are
  masked by comparison with the k-th largest logit. No NonZero, scatter, loop over the batch or
  data-dependent shape, so it exports to ONNX with a dynamic batch.

In eval mode the two forms give the same output (up to float error, ties between logits aside).
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor, nn

from .config import HMMoEConfig
from .experts import EXPERTS, Expert, State
from .router import Router


def _rows(state: Tensor, samples: Tensor) -> Tensor:
    """The per-sample state of the given samples; a batch-1 (broadcast) state is shared as is."""
    return state if state.shape[0] == 1 else state.index_select(0, samples)


class HMMoELayer(nn.Module):
    """The adapter beside one block's FFN; returns HMMoE(x, ctx), without residual or scale s.

    `context_proj` maps the raw text states to the image width; the router and experts work at
    that width. `deploy_form` chooses the form (see the module docstring). `aux_loss` is
    `balance_loss_weight` times the router's balance loss of the last training-mode forward.

    Shapes:
        x [B, N, dim] (layer-normed image tokens), context [B or 1, T, context_dim],
        mask [B or 1, T] or None (which context tokens are real; None: all) -> [B, N, dim]
    """

    def __init__(self, dim: int, context_dim: int, config: HMMoEConfig):
        super().__init__()
        self.config = config
        self.context_proj = nn.Linear(context_dim, dim)
        self.router = Router(
            dim, len(config.experts), config.top_k, config.router, config.router_noise
        )
        self.experts = nn.ModuleList(EXPERTS[name](dim, config.rank) for name in config.experts)
        self.deploy_form = False
        self._balance_loss: Tensor | None = None

    @property
    def aux_loss(self) -> Tensor:
        """Weighted balance loss of the last forward in training mode; a zero scalar in eval."""
        if self.training and self._balance_loss is not None:
            return self._balance_loss
        return self.context_proj.weight.new_zeros(())

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        ctx = self.context_proj(context)
        logits = self.router(x, ctx, mask)
        if self.training:
            self._balance_loss = self.config.balance_loss_weight * self.router.balance_loss(logits)
        if self.deploy_form:
            return self._deploy_forward(x, ctx, mask, logits)
        return self._dispatch_forward(x, ctx, mask, logits)

    def _deploy_forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None,
                        logits: Tensor) -> Tensor:
        gates = self.router.masked_gates(logits)
        if self.router.granularity == "sample":
            gates = gates.unsqueeze(1)  # [B, 1, E]: one gate per sample, broadcast over tokens
        weighted = (
            gates[..., index : index + 1] * expert(x, ctx, mask)
            for index, expert in enumerate(self.experts)
        )
        return functools.reduce(operator.add, weighted)  # no zeros_like: it exports as an Expand

    def _dispatch_forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None,
                          logits: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        gates, expert_ids = self.router.top_k_gates(logits)
        samples = torch.arange(batch, device=x.device)
        if self.router.granularity == "token":
            # every token becomes a routed unit: a length-1 sequence of its own sample
            units = x.reshape(batch * tokens, 1, dim)
            sample_of_unit = samples.repeat_interleave(tokens)
            gates, expert_ids = gates.flatten(0, 1), expert_ids.flatten(0, 1)
        else:
            units, sample_of_unit = x, samples
        output = torch.zeros_like(units)
        for index, expert in enumerate(self.experts):
            unit_ids, slots = (expert_ids == index).nonzero(as_tuple=True)
            if unit_ids.numel() == 0:
                continue
            routed = self._run_on_units(expert, x, ctx, mask, units, sample_of_unit, unit_ids)
            output = output.index_add(0, unit_ids, gates[unit_ids, slots].view(-1, 1, 1) * routed)
        return output.reshape(batch, tokens, dim)

    @staticmethod
    def _run_on_units(
        expert: Expert,
        x: Tensor,
        ctx: Tensor,
        mask: Tensor | None,
        units: Tensor,
        sample_of_unit: Tensor,
        unit_ids: Tensor,
    ) -> Tensor:
        """The expert on the chosen units, conditioned on their whole samples."""
        samples = sample_of_unit.index_select(0, unit_ids)
        state: State = tuple(_rows(part, samples) for part in expert.condition(x, ctx, mask))
        return expert.map_tokens(units.index_select(0, unit_ids), state)
