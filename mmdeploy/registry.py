"""Adapter name -> model class (which names its config class).

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


def adapter_class(name: str) -> type[AdaptedModel]:
    if name not in ADAPTERS:
        raise ConfigError(f"unknown adapter {name!r}; choose from {', '.join(sorted(ADAPTERS))}")
    module, attribute = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
