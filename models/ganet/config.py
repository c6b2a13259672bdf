"""GA-Net adapter options, validated on construction (and so on `from_dict`)."""

from __future__ import annotations

from dataclasses import dataclass

from mmdeploy.config import ConfigBase
from mmdeploy.errors import ConfigError

MESSAGE_PASSING = ("auto", "pyg", "dense")


@dataclass
class GANetConfig(ConfigBase):
    """The graph adapter X' = X + alpha * W_up relu(GCN(A, W_down X)) and a linear head.

    A query node links to its `k` most similar memory-bank nodes whose cosine similarity is
    above `tau`; the bank holds the C class nodes and up to `bank_size` training nodes.
    `rank` is the bottleneck width. `ewc_lambda` is the EWC strength this adapter trains
    with unless `train --ewc-lambda` says otherwise (1.0, as the paper's notes choose).
    `message_passing` picks the training form: torch_geometric's GCNConv (`pyg`), the dense
    algebra the export uses (`dense`), or `auto` (pyg when torch_geometric is installed).
    """

    rank: int = 512
    k: int = 5
    tau: float = 0.4
    bank_size: int = 256
    alpha: float = 1.0
    ewc_lambda: float = 1.0
    message_passing: str = "auto"

    def __post_init__(self) -> None:
        for name in ("rank", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GANetConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("bank_size", "ewc_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"GANetConfig.{name} = {getattr(self, name)}: must be >= 0")
        if not -1.0 <= self.tau < 1.0:
            raise ConfigError(f"GANetConfig.tau = {self.tau}: must be in [-1, 1) (a cosine)")
        if self.message_passing not in MESSAGE_PASSING:
            raise ConfigError(f"GANetConfig.message_passing = {self.message_passing!r}: must "
                              f"be one of {', '.join(MESSAGE_PASSING)}")
