"""The one interface every runtime backend implements, and what they all do alike: find the
export record they serve, check its files' hashes, and keep to its batch range; for a vqa
run, check and tokenize the questions (`mmdeploy.questions`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from ..artifacts import ExportRecord, RunDir
from ..errors import BackendUnavailableError, InputError
from ..images import Preprocessor
from ..questions import TOKENIZER_DIR, QuestionTokenizer, check_question
from ..runs import RunConfig, load_run_config
from .records import verified_record

Inputs = np.ndarray | tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Answers:
    """A vqa run's predictions: answer probabilities [B, A], top-1 answer indices [B], and
    which questions were cut at the tokenizer's limit (answered from their first tokens)."""

    probs: np.ndarray
    labels: np.ndarray
    truncated: list[bool]


class Predictor(ABC):
    """`predict(images) -> (probs, labels)` on one backend; preprocessing is shared. For a
    vqa run (`task == "vqa"`): `predict_questions(images, questions) -> Answers`.

    Subclasses implement `run_pixels` on preprocessed pixels [B, 3, H, W] float32 and return
    the exported outputs (`logits` [B, C], `embeddings` [B, D]); those that serve vqa runs
    implement `run_questions` on pixels and token ids. A predictor of an export names its
    record (`record`): the base finds it in the manifest (only one that passed its check),
    verifies its files' sha256 and takes its batch range.
    """

    backend: str = ""
    device: str = "cpu"  # where it runs: "cpu" or "cuda"
    precision: str = "fp32"
    task: str = "classification"  # the run's: "vqa" predicts with `predict_questions`

    def __init__(self, run_path: str | Path, record: str | None = None):
        self.run_dir = RunDir(Path(run_path))
        self.run: RunConfig = load_run_config(self.run_dir)
        self.task = self.run.task
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
        if self.task != "classification":
            raise InputError(f"this is a {self.task} run: ask a question with each image")
        pixel_values = self.check_pixels(pixel_values)
        logits = in_chunks(lambda chunk: self.run_pixels(chunk)["logits"], pixel_values,
                           self.batch_range)
        probs = softmax(logits)
        return probs, probs.argmax(-1)

    # -- vqa runs: an image and a question --------------------------------------------------
    @cached_property
    def question_tokenizer(self) -> QuestionTokenizer:
        """The tokenizer the export saved beside its graph (the torch backend: the run's)."""
        return QuestionTokenizer.load(self.run_dir.export_dir / TOKENIZER_DIR)

    def run_questions(self, pixel_values: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Exported outputs for preprocessed pixels and the questions' tokens, one each."""
        raise BackendUnavailableError(self.backend, "it serves image-only runs, not image + "
                                      "question; choose another --backend")

    def predict_questions(self, images: list[Image.Image], questions: list) -> Answers:
        """Answers for decoded RGB images, each with its question (`check_question`)."""
        return self.predict_question_pixels(self.preprocessor(images), questions)

    def predict_question_pixels(self, pixel_values: np.ndarray, questions: list) -> Answers:
        """`predict_questions` on pixels already preprocessed, in chunks of at most the
        export's largest batch; the questions are padded to the longest of them all."""
        if self.task != "vqa":
            raise InputError(f"this is a {self.task} run: it takes images, not questions")
        pixel_values = self.check_pixels(pixel_values)
        if len(questions) != len(pixel_values):
            raise InputError(f"{len(questions)} question(s) for {len(pixel_values)} image(s): "
                             "one question per image")
        encoded = self.question_tokenizer.encode([check_question(q) for q in questions])
        logits = in_chunks(lambda chunk: self.run_questions(*chunk)["logits"],
                           (pixel_values, encoded.input_ids, encoded.attention_mask),
                           self.batch_range)
        probs = softmax(logits)
        return Answers(probs, probs.argmax(-1), encoded.truncated)


def check_shape(pixel_values: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """`pixel_values` as contiguous float32 [B, 3, H, W]; `InputError` naming the shape
    expected otherwise."""
    expected = (3, *image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                         f"[batch, {', '.join(map(str, expected))}]")
    return np.ascontiguousarray(pixel_values, dtype=np.float32)


def in_chunks(run: Callable[[Inputs], np.ndarray], inputs: Inputs,
              batch_range: tuple[int, int | None]) -> np.ndarray:
    """`run` over `inputs` (an array, or a tuple of arrays with the same rows) in chunks of
    at most the export's largest batch, outputs concatenated. A chunk smaller than its
    smallest batch is padded with copies of its last row, whose outputs are dropped (rows
    are independent of each other: parity holds at every batch size)."""
    arrays = inputs if isinstance(inputs, tuple) else (inputs,)
    low, high = batch_range
    rows = len(arrays[0])
    size = high or rows
    outputs = []
    for start in range(0, rows, size):
        chunk = tuple(_padded(a[start:start + size], low) for a in arrays)
        out = run(chunk if isinstance(inputs, tuple) else chunk[0])
        outputs.append(out[:min(size, rows - start)])
    return np.concatenate(outputs)


def _padded(chunk: np.ndarray, low: int) -> np.ndarray:
    missing = low - len(chunk)
    return np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)]) \
        if missing > 0 else chunk


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)
