"""Questions in, token ids out, for vqa runs: the one place a question is checked and
tokenized at serving time, so every backend and every entry point (infer, the app, Ray)
refuses and truncates alike.

A question is tokenized as the run was trained (`Backbone.tokenize`): the run's own
tokenizer, padded to the longest question of the batch, truncated at `max_length` tokens
(the text tower's limit). An export saves the tokenizer beside its graph
(`export/tokenizer/`, `save_tokenizer`) with that limit, so a served run needs no model hub
and no backbone: `QuestionTokenizer.load`. A question over the limit is answered from its
first `max_length` tokens and says so (`EncodedQuestions.truncated`); an empty one, or one
that is not UTF-8 text, is refused in one line (`check_question`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import atomic_write_json, read_json
from .errors import ArtifactError, InputError

TOKENIZER_DIR = "tokenizer"
"""The export's tokenizer folder (relative to `export/`), as `save_pretrained` writes it."""
LIMITS_FILE = "question_limits.json"  # in TOKENIZER_DIR: {"max_length": T}
MAX_QUESTION_CHARS = 4096
"""Longer questions are refused before tokenizing: no real question is this long, and a
tokenizer's time grows with the text it is given."""


def check_question(question: object) -> str:
    """The question as text, stripped; `InputError` in one line for what cannot be asked:
    none, not text (bytes must be UTF-8), empty, or absurdly long."""
    if question is None:
        raise InputError("no question: a vqa run answers an image and a question")
    if isinstance(question, bytes):
        try:
            question = question.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"the question is not UTF-8 text (byte {exc.start})") from None
    if not isinstance(question, str):
        raise InputError(f"the question must be text, not {type(question).__name__}")
    try:  # undecodable bytes read leniently (a manifest line, argv) arrive as surrogates
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the question is not UTF-8 text (character {exc.start})") from None
    text = question.strip()
    if not text:
        raise InputError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"the question has {len(text)} characters; at most "
                         f"{MAX_QUESTION_CHARS} are read")
    return text


@dataclass(frozen=True)
class EncodedQuestions:
    """A batch of questions as the two-input engine takes them: token ids and attention mask
    (int64 [B, T], padded to the batch's longest), and which questions were cut to fit."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: list[bool]


class QuestionTokenizer:
    """The run's tokenizer with its length limit: `encode(questions)`."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def load(cls, directory: Path) -> QuestionTokenizer:
        """The tokenizer an export saved (`save_tokenizer`): local files only, never code."""
        from transformers import AutoTokenizer

        limits = directory / LIMITS_FILE
        if not limits.is_file():
            raise ArtifactError(f"{directory}: no saved tokenizer (missing {LIMITS_FILE}); "
                                "re-export the run")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                      trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{directory}: the saved tokenizer does not load "
                                f"({str(exc).splitlines()[0]})") from None
        return cls(tokenizer, int(read_json(limits)["max_length"]))

    def encode(self, questions: list[str]) -> EncodedQuestions:
        """Token ids and mask for checked questions (`check_question`), padded to the
        longest, each cut at `max_length` tokens exactly as training cut it."""
        if not questions:
            raise InputError("no questions to encode")
        full = self.tokenizer(questions, truncation=False, verbose=False)["input_ids"]
        tokens = self.tokenizer(questions, padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="np",
                                return_token_type_ids=False)
        return EncodedQuestions(tokens["input_ids"].astype(np.int64),
                                tokens["attention_mask"].astype(np.int64),
                                [len(ids) > self.max_length for ids in full])


def save_tokenizer(tokenizer, max_length: int, directory: Path) -> list[str]:
    """Write `tokenizer` and its limit to `directory` (created); the files written, relative
    to it, for the export record to hash."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    atomic_write_json(directory / LIMITS_FILE, {"max_length": max_length})
    return sorted(p.name for p in directory.iterdir() if p.is_file())
