"""A labelled split as the trainer holds it: decoded and preprocessed once, since the
backbone is frozen."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mmdeploy.backbone import Backbone
from mmdeploy.data import Sample, read_image

DECODE_CHUNK = 256


@dataclass
class Split:
    """inputs [N, ...]: pixels [N, 3, H, W], or what the model's frozen prefix made of them
    (`frozen_cache`); labels [N]; captions ("" when missing)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: torch.Tensor) -> Split:
        return Split(self.inputs[ids], self.labels[ids], [self.captions[i] for i in ids.tolist()])

    def batches(self, size: int) -> Iterator[Split]:
        for start in range(0, len(self), size):
            yield self.batch(torch.arange(start, min(start + size, len(self))))


def pixel_chunks(samples: list[Sample], backbone: Backbone, desc: str,
                 size: int = DECODE_CHUNK) -> Iterator[torch.Tensor]:
    """The samples' preprocessed pixels, `size` images at a time, with a progress bar."""
    for start in tqdm(range(0, len(samples), size), desc=desc, unit="batch", leave=False):
        images = [read_image(s) for s in samples[start:start + size]]
        yield torch.from_numpy(backbone.preprocessor(images))


def labels_and_captions(samples: list[Sample]) -> tuple[torch.Tensor, list[str]]:
    return (torch.tensor([s.label for s in samples], dtype=torch.long),
            [s.caption or "" for s in samples])


def decode(samples: list[Sample], backbone: Backbone, desc: str) -> Split:
    """The samples as pixels."""
    return Split(torch.cat(list(pixel_chunks(samples, backbone, desc))),
                 *labels_and_captions(samples))
