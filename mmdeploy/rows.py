"""What a prediction row holds: the one output format of batch inference, the app, Ray
Serve and the Triton client.

A row is {"path", "label", "score", "topk": [[label, prob], ...], "error"}; over several
runs (`infer --shared`) {"path", "run", ...}, the run's name added (`with_run`); for a vqa
run {"path", "question", "answer", "score", "topk", "truncated", "error"} (`answer_row`),
`truncated` true when the question was cut at the tokenizer's limit. Paths and questions
are display names (`data.display_name`) and error messages are one line, so every row can
be written as one physical line (`inference.writers`).
"""

from __future__ import annotations

import numpy as np

from .data import display_name

COLUMNS = ["path", "label", "score", "topk", "error"]
VQA_COLUMNS = ["path", "question", "answer", "score", "topk", "truncated", "error"]
"""The rows of a vqa run: one per image and question (an image may be asked twice)."""
SHARED_COLUMNS = ["path", "run", *COLUMNS[1:]]
"""The rows of several runs (`infer --shared`): one per input and run, naming the run."""


def prediction_row(name: str, prob: np.ndarray, label: int, class_names: list[str],
                   top_k: int) -> dict:
    order = prob.argsort()[::-1][:top_k]
    return {"path": name, "label": class_names[label], "score": round(float(prob[label]), 6),
            "topk": [[class_names[i], round(float(prob[i]), 6)] for i in order], "error": None}


def error_row(name: str, message: str) -> dict:
    return {"path": name, "label": None, "score": None, "topk": [], "error": message}


def with_run(row: dict, run: str) -> dict:
    """`row` as a row of run `run` (`SHARED_COLUMNS`, in that order)."""
    return {"path": row["path"], "run": run, **{key: row[key] for key in COLUMNS[1:]}}


def shown_question(question: object) -> str:
    """A question as its row shows it and `--resume` keys it: stripped, as one line of valid
    UTF-8 text (undecodable bytes as \\xNN); "" where there is no text at all."""
    return display_name(question.strip()) if isinstance(question, str) else ""


def answer_row(name: str, question: str, prob: np.ndarray, label: int, answers: list[str],
               top_k: int, truncated: bool) -> dict:
    """A vqa run's row: the image, its question (`shown_question`), the top answer, the
    top-k answers, and whether the question was cut to fit."""
    row = prediction_row(name, prob, label, answers, top_k)
    return {"path": name, "question": question, "answer": row["label"], "score": row["score"],
            "topk": row["topk"], "truncated": bool(truncated), "error": None}


def question_error_row(name: str, question: str, message: str) -> dict:
    """A vqa run's error row (an image that cannot be read, a question that cannot be
    asked)."""
    return {"path": name, "question": question, "answer": None, "score": None, "topk": [],
            "truncated": False, "error": message}
