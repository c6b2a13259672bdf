"""The one interface every runtime backend implements, and what they all do alike: find the
export record they serve, check its files' hashes, and keep to its batch range."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts import ExportRecord, RunDir
from ..errors import InputError
from ..images import Preprocessor
from ..runs import RunConfig, load_run_config
from .records import verified_record


class Predictor(ABC):
    """`predict(images) -> (probs, labels)` on one backend; preprocessing is shared.

    Subclasses implement `run` on preprocessed pixels [B, 3, H, W] float32 and return the
    exported outputs (`logits` [B, C], `embeddings` [B, D]). A predictor of an export names
    its record (`record`): the base finds it in the manifest (only one that passed its
    check), verifies its files' sha256 and takes its batch range.
    """

    backend: str = ""
    device: str = "cpu"  # where it runs: "cpu" or "cuda"
    precision: str = "fp32"

    def __init__(self, run_path: str | Path, record: str | None = None):
        self.run_dir = RunDir(Path(run_path))
        self.run: RunConfig = load_run_config(self.run_dir)
        self.run.require_classification(f"{run_path}")
        self.class_names = self.run.class_names
        self.preprocessor = Preprocessor.from_dict(self.run.preprocessing)
        self.batch_range: tuple[int, int | None] = (1, None)  # inclusive; None = unbounded
        self.record: ExportRecord | None = None
        if record is not None:
            self.record = verified_record(self.run_dir, record)
            self.batch_range = self.record.batch_limits

    def describe(self) -> str:
        """The backend and where it runs, for the user."""
        return self.backend

    @abstractmethod
    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Exported outputs for preprocessed pixels."""

    def check_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Refuse a tensor this predictor cannot take, naming what it expected: a wrong
        shape, or fewer images than the export's smallest batch (a larger batch is cut into
        chunks by `predict_pixels`)."""
        pixel_values = check_shape(pixel_values, self.preprocessor.image_size)
        low, high = self.batch_range
        if pixel_values.shape[0] < low:
            raise InputError(f"batch {pixel_values.shape[0]} is outside the export's range "
                             f"{low}..{high}")
        return pixel_values

    def predict(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities [B, C] and top-1 label indices [B] for decoded RGB images."""
        return self.predict_pixels(self.preprocessor(images))

    def predict_pixels(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`predict` on pixels already preprocessed (batch inference does that in threads),
        in chunks of at most the export's largest batch."""
        pixel_values = self.check_pixels(pixel_values)
        logits = in_chunks(lambda chunk: self.run_pixels(chunk)["logits"], pixel_values,
                           self.batch_range)
        probs = softmax(logits)
        return probs, probs.argmax(-1)


def check_shape(pixel_values: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """`pixel_values` as contiguous float32 [B, 3, H, W]; `InputError` naming the shape
    expected otherwise."""
    expected = (3, *image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                         f"[batch, {', '.join(map(str, expected))}]")
    return np.ascontiguousarray(pixel_values, dtype=np.float32)


def in_chunks(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray,
              batch_range: tuple[int, int | None]) -> np.ndarray:
    """`run` over `inputs` in chunks of at most the export's largest batch, outputs
    concatenated. A chunk smaller than its smallest batch is padded with copies of its last
    row, whose outputs are dropped (rows are independent of each other: parity holds at
    every batch size)."""
    low, high = batch_range
    size = high or len(inputs)
    outputs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start:start + size]
        missing = low - len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)]) \
            if missing > 0 else chunk
        outputs.append(run(padded)[:len(chunk)])
    return np.concatenate(outputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)
