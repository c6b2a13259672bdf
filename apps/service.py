"""What the app does with an upload, without any web framework: decode, predict, time.

`Classifier` loads a run once and keeps one predictor for every request. An upload goes
through the steps `mmdeploy infer` takes for a file: `load_image` (size and
decompression-bomb limits), `Preprocessor.check` and the preprocessor, `predict_pixels`,
and `rows.prediction_row` / `rows.error_row`; so it gets the row `infer` writes for it.

A vqa run's uploads come with questions (`Classifier.answer`): one question for every
image of the request, or one per image in upload order (`pair_questions`), each checked
by `questions.check_question` before any image is decoded, so a bad question refuses the
request in one line; the rows are `infer`'s for that image and question (`rows.answer_row`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import display_name
from ..errors import InputError, MmdeployError
from ..images import MAX_IMAGE_PIXELS, ImageSource, Preprocessor, image_pixels, load_image
from ..info import describe_run
from ..questions import check_question
from ..rows import answer_row, error_row, prediction_row, question_error_row, shown_question
from ..runtime import default_precision, load_predictor, pick_backend
from ..runtime.base import Answers
from ..runtime.memory import release_freed_memory

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
    decode_ms: float  # decoding and preprocessing
    model_ms: float

    @property
    def predicted(self) -> list[dict]:
        return [row for row in self.rows if row["error"] is None]

    @property
    def errors(self) -> list[str]:
        return [row["error"] for row in self.rows if row["error"] is not None]


@dataclass
class Decoded:
    """A request's uploads after decoding: an error row where one failed (None elsewhere),
    and for the others, in upload order, their position, name, pixels and thumbnail."""

    rows: list[dict | None]
    positions: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None
    thumbnails: list[Image.Image] = field(default_factory=list)


class PixelBudget:
    """Caps the pixels being decoded and preprocessed at once across all requests of a
    server, so that concurrent requests of huge images take turns instead of adding up:
    the worst case is one image at the decode limit, whatever the concurrency. An image
    larger than the budget (it cannot be: `MAX_IMAGE_PIXELS` refuses it) would wait for an
    empty budget and run alone."""

    def __init__(self, pixels: int = MAX_IMAGE_PIXELS):
        self.capacity = pixels
        self._in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self._in_use + pixels <= self.capacity)
            self._in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= pixels
                self._changed.notify_all()


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
        self.budget = PixelBudget()

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @property
    def task(self) -> str:
        """`classification` (`classify`) or `vqa` (`answer`)."""
        return self.predictor.task

    def public_details(self, show_paths: bool = False) -> dict:
        """`details` as a client may see them: with no server path in them (the run and a
        local backbone by their folder's name) unless `show_paths`."""
        if show_paths:
            return self.details
        spec = ",".join(folder_name(part) for part in self.details["backbone"].split(","))
        return {**self.details, "run": self.run_path.name, "backbone": spec}

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

    def answer(self, uploads: list[tuple[str, str | os.PathLike]],
               questions: list) -> Prediction:
        """A vqa run's `classify`: each upload answered with its question (`pair_questions`);
        a bad question, or a request that breaks a limit, is an `InputError`."""
        try:
            prediction = self._answer(uploads, questions)
        except MmdeployError:
            self.counters.add(len(uploads), failed=True)
            raise
        self.counters.add(len(uploads), failed=False)
        return prediction

    def fill_answer_rows(self, decoded: Decoded, questions: list[str],
                         answers: Answers) -> list[dict]:
        """A vqa request's rows: each decoded upload's answer row in its place, with its
        question; an upload that did not decode keeps its error, with its question."""
        return fill_answer_rows(decoded, questions, answers, self.class_names,
                                self.limits.top_k)

    def decode(self, uploads: list[tuple[str, ImageSource]], thumbnails: bool = False,
               ) -> Decoded:
        """`decode_uploads` with this run's preprocessing, within the server's pixel budget."""
        return decode_uploads(uploads, self.predictor.preprocessor, self.budget, thumbnails)

    def fill_rows(self, decoded: Decoded, probs: np.ndarray, labels: np.ndarray) -> list[dict]:
        """The request's rows: each decoded upload's prediction row in its place."""
        return fill_rows(decoded, probs, labels, self.class_names, self.limits.top_k)

    def _classify(self, uploads: list[tuple[str, str | os.PathLike]]) -> Prediction:
        check_count(uploads, self.limits)
        started = time.perf_counter()
        decoded = self.decode([(display_name(name), path) for name, path in uploads],
                              thumbnails=True)
        decode_done = time.perf_counter()
        rows = self.fill_rows(decoded, *self.predictor.predict_pixels(decoded.pixels))
        model_done = time.perf_counter()
        thumbnails = [(image, _caption(rows[position]))
                      for position, image in zip(decoded.positions, decoded.thumbnails,
                                                 strict=True)]
        return Prediction(rows, thumbnails, self.backend, (decode_done - started) * 1e3,
                          (model_done - decode_done) * 1e3)

    def _answer(self, uploads: list[tuple[str, str | os.PathLike]],
                questions: list) -> Prediction:
        check_count(uploads, self.limits)
        asked = pair_questions(questions, len(uploads))
        started = time.perf_counter()
        decoded = self.decode([(display_name(name), path) for name, path in uploads],
                              thumbnails=True)
        decode_done = time.perf_counter()
        answers = self.predictor.predict_question_pixels(
            decoded.pixels, [asked[position] for position in decoded.positions])
        rows = self.fill_answer_rows(decoded, asked, answers)
        model_done = time.perf_counter()
        thumbnails = [(image, _answer_caption(rows[position]))
                      for position, image in zip(decoded.positions, decoded.thumbnails,
                                                 strict=True)]
        return Prediction(rows, thumbnails, self.backend, (decode_done - started) * 1e3,
                          (model_done - decode_done) * 1e3)


def pair_questions(questions: list, count: int) -> list[str]:
    """A request's questions, one per image: one question asks all `count` images, or one
    per image in upload order; each checked (`check_question`). `InputError` otherwise."""
    if not questions:
        raise InputError("no question: a vqa run answers each image with a question (the "
                         "`question` field)")
    if len(questions) not in (1, count):
        raise InputError(f"{len(questions)} questions for {count} images: send one question "
                         "for all the images, or one per image in upload order")
    checked = [check_question(question) for question in questions]
    return checked * count if len(checked) == 1 else checked


def check_count(uploads: list, limits: ServeLimits) -> None:
    """A request carries at least one upload and at most `limits.max_images`."""
    if not uploads:
        raise InputError("no image uploaded: choose one or more image files")
    if len(uploads) > limits.max_images:
        raise InputError(f"{len(uploads)} images uploaded; the limit is "
                         f"{limits.max_images} a request")


def decode_uploads(uploads: list[tuple[str, ImageSource]], preprocessor: Preprocessor,
                   budget: PixelBudget, thumbnails: bool = False) -> Decoded:
    """Decode and preprocess `(name, file or bytes)` uploads as `infer` reads a file, one
    at a time and within the server's pixel `budget`: each decoded image is released once
    its pixels (and, if asked, its thumbnail) are taken, so a request holds at most one
    full-size image however many it carries. An error row for each upload that fails;
    if none decodes, an `InputError` naming every reason."""
    decoded = Decoded([None] * len(uploads))
    pixels: list[np.ndarray] = []
    for position, (name, source) in enumerate(uploads):
        with budget.hold(image_pixels(source)):
            try:
                image = load_image(source, name=name)
                preprocessor.check(image, name)
            except InputError as exc:
                decoded.rows[position] = error_row(name, str(exc))
                continue
            pixels.append(preprocessor([image]))
            if thumbnails:
                image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # in place: no copy
                decoded.thumbnails.append(image)
            del image
        release_freed_memory()
        decoded.positions.append(position)
        decoded.names.append(name)
    if not pixels:
        raise InputError("; ".join(row["error"] for row in decoded.rows))
    decoded.pixels = np.concatenate(pixels)
    return decoded


def fill_rows(decoded: Decoded, probs, labels, class_names: list[str], top_k: int,
              ) -> list[dict]:
    """A request's rows: each decoded upload's prediction row in its place (`decoded.rows`
    holds the error rows)."""
    rows = list(decoded.rows)
    for position, name, prob, label in zip(decoded.positions, decoded.names, probs, labels,
                                           strict=True):
        rows[position] = prediction_row(name, prob, int(label), class_names, top_k)
    return rows


def fill_answer_rows(decoded: Decoded, questions: list[str], answers: Answers,
                     answer_names: list[str], top_k: int) -> list[dict]:
    """`fill_rows` for a vqa request: `questions` are the checked questions of all its
    uploads (decoded or not), `answers` those of the decoded ones."""
    rows = [None if row is None else
            question_error_row(row["path"], shown_question(question), row["error"])
            for row, question in zip(decoded.rows, questions, strict=True)]
    for position, name, prob, label, cut in zip(decoded.positions, decoded.names,
                                                answers.probs, answers.labels,
                                                answers.truncated, strict=True):
        rows[position] = answer_row(name, shown_question(questions[position]), prob,
                                    int(label), answer_names, top_k, cut)
    return rows


def folder_name(spec: str) -> str:
    """A local checkpoint path as its folder's name; a hub id or `tiny` as it is."""
    return Path(spec).name if os.path.isabs(spec) or Path(spec).exists() else spec


def _caption(row: dict) -> str:
    return f"{row['path']}: {row['label']} ({row['score']:.0%})"


def _answer_caption(row: dict) -> str:
    return f"{row['path']}: {row['question']} {row['answer']} ({row['score']:.0%})"
