"""What the app does with an upload, without any web framework: decode, predict, time.

`Classifier` loads a run once and keeps one predictor for every request. An upload goes
through the steps `mmdeploy infer` takes for a file: `load_image` (size and
decompression-bomb limits), `Preprocessor.check` and the preprocessor, `predict_pixels`,
and `rows.prediction_row` / `rows.error_row`; so it gets the row `infer` writes for it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data import display_name
from ..errors import InputError, MmdeployError
from ..images import MAX_IMAGE_PIXELS, ImageSource, load_image
from ..info import describe_run
from ..rows import error_row, prediction_row
from ..runtime import default_precision, load_predictor, pick_backend

THUMBNAIL_SIZE = 256


@dataclass(frozen=True)
class ServeLimits:
    """What one request may carry. Uploads over `max_file_bytes` are refused by Gradio
    before they reach us; images over `MAX_IMAGE_PIXELS` by `load_image`."""

    max_images: int = 16
    max_file_bytes: int = 16 * 1024 * 1024
    top_k: int = 5

    def describe(self) -> str:
        return (f"{self.max_images} images a request, {self.max_file_bytes // 2**20} MiB "
                f"and {MAX_IMAGE_PIXELS:,} pixels an image")


@dataclass
class Prediction:
    """One request's result: a row per upload, in upload order (infer's row format), and a
    thumbnail for each image that decoded."""

    rows: list[dict]
    thumbnails: list[tuple[Image.Image, str]]
    backend: str
    decode_ms: float
    model_ms: float

    @property
    def predicted(self) -> list[dict]:
        return [row for row in self.rows if row["error"] is None]

    @property
    def errors(self) -> list[str]:
        return [row["error"] for row in self.rows if row["error"] is not None]


@dataclass
class Counters:
    """Requests served since start, for the health endpoint; updated from worker threads."""

    requests: int = 0
    images: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, images: int, failed: bool) -> None:
        with self._lock:
            self.requests += 1
            self.images += images
            self.failed += failed

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "images": self.images, "failed": self.failed}


class Classifier:
    """A run and one predictor, loaded once and shared by every request (thread-safe: ONNX
    Runtime sessions and torch inference may be called from several threads)."""

    def __init__(self, run_path: str | os.PathLike, backend: str | None = None,
                 limits: ServeLimits | None = None, precision: str | None = None):
        self.run_path = Path(run_path)
        self.limits = limits or ServeLimits()
        self.details = describe_run(self.run_path)
        # INT8 only when asked for, or when the export said so (`export --serve-int8`).
        self.precision = precision or default_precision(self.run_path)
        chosen, self.skipped = pick_backend(self.run_path, backend, self.precision)
        self.predictor = load_predictor(self.run_path, chosen, self.precision)
        described = self.predictor.describe()
        # Said wherever the backend is shown (page, results, /health) when it is not FP32.
        self.backend = described if self.precision == "fp32" else f"{described}, {self.precision}"
        self.counters = Counters()

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    def classify(self, uploads: list[tuple[str, str | os.PathLike]]) -> Prediction:
        """Predict `(name, path)` uploads. Files that fail to decode get an error row; if
        none decodes (or the request breaks a limit) an `InputError` says why."""
        try:
            prediction = self._classify(uploads)
        except MmdeployError:
            self.counters.add(len(uploads), failed=True)
            raise
        self.counters.add(len(uploads), failed=False)
        return prediction

    def decode(self, uploads: list[tuple[str, ImageSource]],
               ) -> tuple[list[dict | None], list[tuple[int, str, Image.Image]]]:
        """Decode `(name, file or bytes)` uploads as `infer` decodes a file: an error row for
        each that fails (None for the others) and `(position, name, image)` for each that
        decodes. If none decodes, an `InputError` naming every reason."""
        rows: list[dict | None] = [None] * len(uploads)
        decoded: list[tuple[int, str, Image.Image]] = []
        for position, (name, source) in enumerate(uploads):
            try:
                image = load_image(source, name=name)
                self.predictor.preprocessor.check(image, name)
            except InputError as exc:
                rows[position] = error_row(name, str(exc))
                continue
            decoded.append((position, name, image))
        if not decoded:
            raise InputError("; ".join(row["error"] for row in rows))
        return rows, decoded

    def _classify(self, uploads: list[tuple[str, str | os.PathLike]]) -> Prediction:
        if not uploads:
            raise InputError("no image uploaded: choose one or more image files")
        if len(uploads) > self.limits.max_images:
            raise InputError(f"{len(uploads)} images uploaded; the limit is "
                             f"{self.limits.max_images} a request")
        started = time.perf_counter()
        rows, decoded = self.decode([(display_name(name), path) for name, path in uploads])
        decode_done = time.perf_counter()
        batch = self.predictor.batch_range[1] or len(decoded)
        for start in range(0, len(decoded), batch):
            chunk = decoded[start:start + batch]
            pixels = self.predictor.preprocessor([image for _, _, image in chunk])
            probs, labels = self.predictor.predict_pixels(pixels)
            for (position, name, _), prob, label in zip(chunk, probs, labels, strict=True):
                rows[position] = prediction_row(name, prob, int(label), self.class_names,
                                                self.limits.top_k)
        model_done = time.perf_counter()
        thumbnails = [(_thumbnail(image), _caption(rows[position]))
                      for position, _, image in decoded]
        return Prediction(rows, thumbnails, self.backend, (decode_done - started) * 1e3,
                          (model_done - decode_done) * 1e3)


def _thumbnail(image: Image.Image) -> Image.Image:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return small


def _caption(row: dict) -> str:
    return f"{row['path']}: {row['label']} ({row['score']:.0%})"
