"""Loss terms any adapter can use."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class EWC:
    """Elastic weight consolidation: lambda/2 * sum_i F_i (theta_i - theta*_i)^2.

    F is the diagonal empirical Fisher (the mean over batches of the squared gradient of the
    task loss), estimated once at the start of training; theta* are the parameters at that
    moment, cloned (aliasing the live tensors would make the penalty always zero, a bug of
    GA-Net's released code). Only trainable parameters take part.
    """

    def __init__(self, fisher: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 strength: float):
        self.fisher = fisher
        self.reference = reference
        self.strength = strength

    @classmethod
    def estimate(cls, model: nn.Module, batches: Iterable, loss_fn: Callable[..., torch.Tensor],
                 strength: float) -> EWC:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        fisher = {n: f / max(count, 1) for n, f in fisher.items()}
        reference = {n: p.detach().clone() for n, p in params.items()}
        return cls(fisher, reference, strength)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, p in model.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (p - self.reference[name]) ** 2).sum()
        return 0.5 * self.strength * total

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ewc.fisher.{n}": t for n, t in self.fisher.items()}
        state.update({f"ewc.reference.{n}": t for n, t in self.reference.items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], strength: float) -> EWC:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        return cls(part("ewc.fisher."), part("ewc.reference."), strength)
