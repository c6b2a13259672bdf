"""Low-rank adapters on frozen `nn.Linear` layers, attached by forward hooks.

Hooks leave the backbone's modules and state-dict keys untouched (a real checkpoint still
loads), and `merge_lora` folds W + s * B @ A into the frozen weight for export, after which
the hook is gone and the layer is a plain Linear again.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """The low-rank update of one Linear: delta(x) = s * B A x, with s = alpha / rank.

    Shapes: x [..., in_features] -> [..., out_features]; A [rank, in], B [out, rank].
    B starts at zero, so an attached LoRA is an exact no-op until trained.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A


def attach_lora(model: nn.Module, targets: tuple[str, ...], rank: int,
                alpha: float) -> nn.ModuleDict:
    """Attach a LoRA to every Linear in `model` whose name ends with one of `targets`.

    Returns the LoRA modules keyed by the layer's dotted name (dots become `__`), for the
    caller to register as its own trainable child.
    """
    loras = nn.ModuleDict()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            lora = LoRA(module.in_features, module.out_features, rank, alpha)
            lora._hook = module.register_forward_hook(_add_lora_output(lora))
            loras[name.replace(".", "__")] = lora
    if not loras:
        raise ValueError(f"no Linear layer named {targets} in {type(model).__name__}")
    return loras


def _add_lora_output(lora: LoRA):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora(inputs[0])

    return hook


@torch.no_grad()
def merge_lora(model: nn.Module, loras: nn.ModuleDict) -> None:
    """Fold each LoRA into its frozen Linear and remove the hook: same function, one matmul."""
    modules = dict(model.named_modules())
    for key, lora in loras.items():
        linear = modules[key.replace("__", ".")]
        linear.weight += lora.delta_weight().to(linear.weight.dtype)
        lora._hook.remove()
        lora._hook = None
