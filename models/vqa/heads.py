"""Answer heads over pooled image [B, Di] and question [B, Dt] features.

Each head layer-normalises the features it reads (the two towers' scales differ widely) and
returns (logits [B, A], embeddings [B, H]): H is what its last linear layer reads.
"""

from __future__ import annotations

import torch
from torch import nn

INPUTS = ("image", "question", "both")


class MLPHead(nn.Module):
    """A linear probe (`hidden` = 0) or a one-hidden-layer MLP on the image, the question or
    their concatenation."""

    def __init__(self, image_dim: int, question_dim: int, answers: int, hidden: int,
                 reads: str):
        super().__init__()
        if reads not in INPUTS:
            raise ValueError(f"a head reads one of {INPUTS}, not {reads!r}")
        self.reads = reads
        self.image_norm = nn.LayerNorm(image_dim) if reads != "question" else None
        self.question_norm = nn.LayerNorm(question_dim) if reads != "image" else None
        width = (image_dim if self.image_norm else 0) + (question_dim if self.question_norm
                                                         else 0)
        self.hidden = (nn.Sequential(nn.Linear(width, hidden), nn.ReLU()) if hidden
                       else nn.Identity())
        self.classifier = nn.Linear(hidden or width, answers)

    def forward(self, image: torch.Tensor,
                question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        if self.image_norm is not None:
            parts.append(self.image_norm(image))
        if self.question_norm is not None:
            parts.append(self.question_norm(question))
        embeddings = self.hidden(torch.cat(parts, dim=-1))
        return self.classifier(embeddings), embeddings


class ProductHead(nn.Module):
    """ReLU(W_i LN(image)) * ReLU(W_q LN(question)), then a linear answer head."""

    def __init__(self, image_dim: int, question_dim: int, answers: int, width: int):
        super().__init__()
        self.image = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, width),
                                   nn.ReLU())
        self.question = nn.Sequential(nn.LayerNorm(question_dim),
                                      nn.Linear(question_dim, width), nn.ReLU())
        self.classifier = nn.Linear(width, answers)

    def forward(self, image: torch.Tensor,
                question: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.image(image) * self.question(question)
        return self.classifier(embeddings), embeddings
