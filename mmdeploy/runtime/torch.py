"""PyTorch eager: the reference every other backend is checked against."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..backbone import torch_device
from ..questions import QuestionTokenizer
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

    @cached_property
    def question_tokenizer(self) -> QuestionTokenizer:
        backbone = self.model.backbone
        return QuestionTokenizer(backbone.tokenizer, backbone.max_text_length)

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(pixel_values)

    def run_questions(self, pixel_values: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(pixel_values, input_ids, attention_mask)

    @torch.inference_mode()
    def _run(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        logits, embeddings = self.model(*(torch.from_numpy(x).to(self.device) for x in inputs))
        return {"logits": logits.float().cpu().numpy(),
                "embeddings": embeddings.float().cpu().numpy()}
