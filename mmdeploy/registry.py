"""Adapter name -> model class (which names its config class), per task.

Model modules are imported only when an adapter is used, so `mmdeploy --help` stays fast.
A new adapter is one folder under `models/` and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .models.base import AdaptedModel

ADAPTERS: dict[str, str] = {
    "ganet": "mmdeploy.models.ganet.model:GANetModel",
    "hmmoe": "mmdeploy.models.hmmoe.model:HMMoEModel",
    "lora": "mmdeploy.models.baselines.model:LoRAModel",
    "linear-probe": "mmdeploy.models.baselines.model:LinearProbeModel",
    "zero-shot": "mmdeploy.models.baselines.model:ZeroShotModel",
}
# image + question -> answer (`mmdeploy.models.vqa`)
_VQA = "mmdeploy.models.vqa.models"
VQA_ADAPTERS: dict[str, str] = {
    "ganet": f"{_VQA}:VqaGANetModel",
    "hmmoe": f"{_VQA}:VqaHMMoEModel",
    "lora": f"{_VQA}:VqaLoRAModel",
    "question-only": f"{_VQA}:QuestionOnlyModel",
    "image-only": f"{_VQA}:ImageOnlyModel",
    "late-fusion": f"{_VQA}:LateFusionModel",
    "late-fusion-mlp": f"{_VQA}:LateFusionMLPModel",
    "product-fusion": f"{_VQA}:ProductFusionModel",
}
ALL_ADAPTERS = sorted(set(ADAPTERS) | set(VQA_ADAPTERS))


def adapter_class(name: str, task: str = "classification") -> type[AdaptedModel]:
    """The model class of adapter `name` for `task` (`classification` or `vqa`)."""
    adapters = VQA_ADAPTERS if task == "vqa" else ADAPTERS
    if name not in adapters:
        other = ADAPTERS if task == "vqa" else VQA_ADAPTERS
        if name in other:
            raise ConfigError(f"adapter {name!r} has no {task} form; for {task} choose from "
                              f"{', '.join(sorted(adapters))}")
        raise ConfigError(f"unknown adapter {name!r}; choose from {', '.join(sorted(adapters))}")
    module, attribute = adapters[name].split(":")
    return getattr(importlib.import_module(module), attribute)
