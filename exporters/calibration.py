"""Calibration data for static INT8: a seeded sample of the run's training split.

Static quantization fixes each activation's range from the images it is shown, so those
images must be what the model will see when served: the run's own training images (never
validation or test, which the accuracy gate measures on), decoded and preprocessed by the
serving `Preprocessor`. A set with no variation (every image one flat colour) would give
ranges that say nothing about real images; it is refused here, in one line, before any
quantization runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mmdeploy.data import read_image
from mmdeploy.errors import ArtifactError, ConfigError, InputError, MmdeployError
from mmdeploy.images import Preprocessor
from mmdeploy.interface import INPUT_NAME, QUESTION_INPUT_NAMES
from mmdeploy.questions import QuestionTokenizer
from mmdeploy.runs import RunConfig
from mmdeploy.runtime.onnxruntime import onnxruntime_required

with onnxruntime_required():
    from onnxruntime.quantization import CalibrationDataReader

BATCH = 16  # images per calibration batch: bounds the intermediate outputs held at once


class PixelReader(CalibrationDataReader):
    """Preprocessed pixels [N, 3, H, W], fed in batches of `BATCH` as {INPUT_NAME: ...}; for
    a vqa graph with each image's question (`questions`: input_ids and attention_mask
    [N, T]), fed beside it under their names.

    `rewind()` starts over, so one reader can serve several calibrations. `len()` counts
    batches and `set_range(start, end)` limits the reader to those batches: with ORT's
    `CalibStridedMinMax` the calibrator then reduces each batch to ranges (or histograms)
    before the next, instead of holding every intermediate output of every image.
    """

    def __init__(self, pixels: np.ndarray, names: list[str] | None = None,
                 seed: int | None = None, split: str | None = None,
                 questions: tuple[np.ndarray, np.ndarray] | None = None):
        self.pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        self.questions = questions
        self.names = names or [f"image {i}" for i in range(len(self.pixels))]
        self.seed, self.split = seed, split  # how the images were drawn, for the manifest
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    @property
    def inputs(self) -> tuple[np.ndarray, ...]:
        """What the graph takes: the pixels (and the questions' tokens)."""
        return (self.pixels, *(self.questions or ()))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def set_range(self, start_index: int, end_index: int) -> None:
        starts = range(start_index * BATCH, min(end_index * BATCH, len(self.pixels)), BATCH)
        names = (INPUT_NAME, *QUESTION_INPUT_NAMES)
        self._batches = ({name: array[i:i + BATCH]
                          for name, array in zip(names, self.inputs, strict=False)}
                         for i in starts)

    def __len__(self) -> int:
        return -(-len(self.pixels) // BATCH)


def training_samples(run: RunConfig):
    """The run's training split, as it was drawn for training."""
    try:
        return run.splits().train
    except MmdeployError as exc:
        raise ArtifactError(f"calibration needs the run's training images ({run.data.source}): "
                            f"{exc}") from None


def calibration_reader(run: RunConfig, preprocessor: Preprocessor, count: int,
                       seed: int, tokenizer: QuestionTokenizer | None = None) -> PixelReader:
    """`count` images of the run's training split (all of it when smaller), drawn with
    `seed`, through the serving preprocessing; for a vqa run (`tokenizer`: the run's) each
    with its training question. Refuses `count` < 1 and a flat set."""
    if count < 1:
        raise ConfigError(f"static INT8 needs calibration images (--calib {count}); use "
                          "--calib N with N >= 1, or --int8 dynamic")
    pool = training_samples(run)
    chosen = np.random.default_rng(seed).permutation(len(pool))[:count]
    samples = [pool[i] for i in sorted(chosen)]
    pixels = preprocessor([read_image(s) for s in samples])
    check_calibration(pixels)
    questions = None
    if run.task == "vqa":
        if tokenizer is None:
            raise ConfigError("a vqa run calibrates on images with their questions: give "
                              "its tokenizer")
        encoded = tokenizer.encode([s.question for s in samples])
        questions = (encoded.input_ids, encoded.attention_mask)
    return PixelReader(pixels, [s.name for s in samples], seed, "train", questions)


def check_calibration(pixels: np.ndarray) -> None:
    """Refuse a calibration set whose images are each one flat colour: every activation
    range computed from it would be that of a blank picture."""
    if len(pixels) == 0:
        raise InputError("calibration set is empty: the run's training split has no images")
    flat = pixels.reshape(len(pixels), 3, -1)
    spread = flat.max(axis=-1) - flat.min(axis=-1)  # per image and channel
    if not (spread > 0).any():
        raise InputError(f"calibration images are constant ({len(pixels)} image(s), each one "
                         "flat colour): no activation range can be calibrated from them; "
                         "calibrate on real images")
