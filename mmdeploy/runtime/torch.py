"""PyTorch eager: the reference every other backend is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backbone import torch_device
from ..runs import load_model
from .base import Predictor


class TorchPredictor(Predictor):
    """The run's own PyTorch model (no export record: the reference the others match)."""

    backend = "torch"

    def __init__(self, run_path: str | Path, device: str | None = None):
        super().__init__(run_path)
        self.device = device or torch_device()
        self.model, _ = load_model(run_path)
        self.model.to(self.device)

    def describe(self) -> str:
        return f"torch ({self.device})"

    @torch.inference_mode()
    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        logits, embeddings = self.model(torch.from_numpy(pixel_values).to(self.device))
        return {"logits": logits.float().cpu().numpy(),
                "embeddings": embeddings.float().cpu().numpy()}
