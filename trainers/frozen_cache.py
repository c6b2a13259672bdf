"""Frozen-prefix caching: each training and validation image goes through the frozen part of
the model once, not once per epoch.

What is frozen depends on the adapter (`AdaptedModel.frozen_features`): the pooled features
for adapters that act after pooling (linear probe, zero-shot, GA-Net), the tokens entering
the first adapted block for HMMoE; LoRA changes every block and caches nothing. The trainer
then feeds the cached features in place of pixels (`AdaptedModel.reads_cache`), so a step
runs only the adapted part. The cache stays in memory up to a bound and is a memory-mapped
file in the run beyond it (removed when training ends), in the dtype the tower computed.
With `train --feature-store DIR` the features of each split also persist across runs
(`feature_store`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from mmdeploy.data import Sample
from mmdeploy.errors import MmdeployError

from . import feature_store
from .split import (
    Split,
    asks_questions,
    distinct_images,
    labels_and_captions,
    pixel_chunks,
    vqa_split,
)

CHUNK = 64  # images through the frozen prefix at a time
CHECK_IMAGES = 4
CHECK_TOLERANCE = 1e-4  # float32: the split forward runs the very same modules


@torch.no_grad()
def cached_split(model, samples: list[Sample], device: str, autocast: AbstractContextManager,
                 desc: str, spill_path: Path, memory_limit_bytes: int,
                 store: Path | None = None) -> Split:
    """The samples as `model.frozen_features` of their pixels, each image computed once,
    `CHUNK` at a time (the decoded pixels of a whole split are never held); a vqa split
    holds each distinct image once, whatever the number of questions asked of it. With a
    `store` (`feature_store`), features computed by an earlier run are read, and those
    computed here are kept for the next."""
    model.eval()
    images, image_index = (distinct_images(samples) if asks_questions(samples)
                           else (samples, None))

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return _allocate(shape, dtype, spill_path, memory_limit_bytes)

    key = storage = None
    if store is not None:
        key = feature_store.entry_key(model.backbone, model.first_adapted_block(), images,
                                      device)
        storage = feature_store.read_entry(store, key, len(images), allocate)
    if storage is None:
        storage = _compute(model, images, device, autocast, desc, allocate)
        if key is not None:
            feature_store.write_entry(store, key, storage)
    if image_index is not None:
        return vqa_split(storage, image_index, samples, model.backbone)
    return Split(storage, *labels_and_captions(samples))


def _compute(model, images: list[Sample], device: str, autocast: AbstractContextManager,
             desc: str, allocate) -> torch.Tensor:
    storage = None
    start = 0
    for pixels in pixel_chunks(images, model.backbone, desc, CHUNK):
        with autocast:
            features = model.frozen_features(pixels.to(device)).cpu()
        if storage is None:
            storage = allocate((len(images), *features.shape[1:]), features.dtype)
        storage[start:start + len(features)] = features
        start += len(features)
    return storage


@torch.no_grad()
def check_split_forward(model, samples: list[Sample], device: str) -> None:
    """Refuse the cache unless the tower split in two inside (`Backbone.vision_tokens` then
    `image_features_from`) gives what its own forward gives, on a few of `samples` in
    float32: a tower whose blocks or final norm are laid out otherwise would train on wrong
    inputs. Pooled features need no check: they are the tower's own output."""
    if model.first_adapted_block() == len(model.backbone.vision_blocks()):
        return
    model.eval()
    images = distinct_images(samples)[0][:CHECK_IMAGES] if asks_questions(samples) \
        else samples[:CHECK_IMAGES]
    pixels = torch.cat(list(pixel_chunks(images, model.backbone, "check split"))).to(device)
    features = model.image_features
    if asks_questions(images):  # a vqa model's image tower reads the question (HMMoE)
        tokens = model.backbone.tokenize([s.question or "" for s in images])
        states = model.encode_question(tokens["input_ids"], tokens["attention_mask"])[1]

        def features(inputs: torch.Tensor) -> torch.Tensor:
            return model.encode_image(inputs, states, tokens["attention_mask"])
    whole = features(pixels)
    model.reads_cache = True
    try:
        split = features(model.frozen_features(pixels))
    finally:
        model.reads_cache = False
    if not torch.allclose(whole, split, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE):
        gap = (whole - split).abs().max().item()
        raise MmdeployError(
            f"the feature cache does not reproduce {type(model.backbone.vision).__name__}'s "
            f"forward (max abs difference {gap:.2e}); train with --no-cache")


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, path: Path,
              memory_limit_bytes: int) -> torch.Tensor:
    numel = math.prod(shape)
    if numel * dtype.itemsize <= memory_limit_bytes:
        return torch.empty(shape, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
