"""A labelled split as the trainer holds it: decoded and preprocessed once, since the
backbone is frozen. A vqa split holds each image once and each question as token ids."""

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
    (`frozen_cache`); labels [N]; captions ("" when missing).

    A vqa split (`image_index` set) holds one row of `inputs` per distinct image and one
    question per sample: `image_index` [N] (its image's row), `input_ids` and
    `attention_mask` [N, T]; a batch of it holds its samples' images row by row."""

    inputs: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    image_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: torch.Tensor) -> Split:
        if self.image_index is None:
            return Split(self.inputs[ids], self.labels[ids],
                         [self.captions[i] for i in ids.tolist()])
        mask = self.attention_mask[ids]
        width = int(mask.any(0).nonzero().max()) + 1  # drop columns that are padding only
        return Split(self.inputs[self.image_index[ids]], self.labels[ids], [],
                     self.input_ids[ids, :width], mask[:, :width])

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


def asks_questions(samples: list[Sample]) -> bool:
    return any(s.question is not None for s in samples)


def distinct_images(samples: list[Sample]) -> tuple[list[Sample], torch.Tensor]:
    """One sample per distinct image (by name, in order of appearance), and each sample's
    index into that list."""
    rows: dict[str, int] = {}
    firsts = []
    for sample in samples:
        if sample.name not in rows:
            rows[sample.name] = len(firsts)
            firsts.append(sample)
    return firsts, torch.tensor([rows[s.name] for s in samples], dtype=torch.long)


def vqa_split(inputs: torch.Tensor, image_index: torch.Tensor, samples: list[Sample],
              backbone: Backbone) -> Split:
    """A vqa split over `inputs` (one row per distinct image): each distinct question is
    tokenized once by the run's tokenizer."""
    questions = sorted({s.question or "" for s in samples})
    tokens = backbone.tokenize(questions) if questions else {}
    row = {question: i for i, question in enumerate(questions)}
    which = torch.tensor([row[s.question or ""] for s in samples], dtype=torch.long)
    return Split(inputs, labels_and_captions(samples)[0], [],
                 tokens["input_ids"].cpu()[which], tokens["attention_mask"].cpu()[which],
                 image_index)


def decode(samples: list[Sample], backbone: Backbone, desc: str) -> Split:
    """The samples as pixels (a vqa split: each image once)."""
    if asks_questions(samples):
        images, image_index = distinct_images(samples)
        pixels = torch.cat(list(pixel_chunks(images, backbone, desc)))
        return vqa_split(pixels, image_index, samples, backbone)
    return Split(torch.cat(list(pixel_chunks(samples, backbone, desc))),
                 *labels_and_captions(samples))
