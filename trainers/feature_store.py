"""Frozen-prefix features kept across runs (`train --feature-store DIR`).

A comparison trains many models on the same images (adapters x seeds x learning rates), and
each run would put every image through the frozen tower again: easy-VQA's test split is
1,000 images through DINOv2-S, minutes a run on a CPU. With a store, a split's features are
computed by the first run that needs them and read by the others.

An entry is one split's features, named by the sha256 of everything they depend on: the
backbone's identity (configs and weights), its image preprocessing, where the tower is cut
(`AdaptedModel.first_adapted_block`: the tower's depth for the pooled features, else the
tokens entering that block), the device kind and each image's
name and bytes, in order. It is a safetensors file written atomically; one whose recorded
key or row count does not match is not used (and is overwritten).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from mmdeploy.artifacts import ArtifactError, atomic_output, safetensors_metadata, sha256_file
from mmdeploy.data import Sample

TENSOR = "features"
COPY_ROWS = 256  # rows copied from an entry at a time
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def entry_key(backbone, cut: int, images: list[Sample], device: str) -> str:
    """The sha256 naming the features of `images` with the tower cut at block `cut` (see the
    module)."""
    digest = hashlib.sha256(json.dumps(
        {"backbone": backbone.identity, "preprocessing": backbone.preprocessor.settings(),
         "cut": cut, "device": torch.device(device).type}, sort_keys=True,
        default=str).encode())
    for sample in images:
        digest.update(sample.name.encode() + b"\0" + _image_digest(sample).encode())
    return digest.hexdigest()


def _image_digest(sample: Sample) -> str:
    if isinstance(sample.image, np.ndarray):
        return hashlib.sha256(repr(sample.image.shape).encode()
                              + np.ascontiguousarray(sample.image).tobytes()).hexdigest()
    return sha256_file(sample.image)


def entry_path(store: Path, key: str) -> Path:
    return Path(store) / f"{key}.safetensors"


def read_entry(store: Path, key: str, rows: int,
               allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
               ) -> torch.Tensor | None:
    """The stored features for `key` copied into `allocate(shape, dtype)` (the trainer's
    in-memory or memory-mapped storage), `COPY_ROWS` rows at a time; None when there is no
    usable entry."""
    from safetensors import safe_open

    path = entry_path(store, key)
    if not path.is_file():
        return None
    try:
        if safetensors_metadata(path).get("key") != key:
            return None
        with safe_open(path, framework="pt") as handle:
            stored = handle.get_slice(TENSOR)
            shape = tuple(stored.get_shape())
            if shape[0] != rows:
                return None
            features = allocate(shape, _DTYPES[stored.get_dtype()])
            for start in range(0, rows, COPY_ROWS):
                features[start:start + COPY_ROWS] = stored[start:start + COPY_ROWS]
            return features
    except (ArtifactError, OSError, KeyError, SafetensorError):
        return None


def write_entry(store: Path, key: str, features: torch.Tensor) -> None:
    import safetensors.torch

    path = entry_path(store, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        safetensors.torch.save_file({TENSOR: features.contiguous()}, str(temporary),
                                    metadata={"key": key})
