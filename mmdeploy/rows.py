"""What a prediction row holds: the one output format of batch inference, the app, Ray
Serve and the Triton client.

A row is {"path", "label", "score", "topk": [[label, prob], ...], "error"}; over several
runs (`infer --shared`) {"path", "run", ...}, the run's name added (`with_run`). Paths are
display names (`data.display_name`) and error messages are one line, so every row can be
written as one physical line (`inference.writers`).
"""

from __future__ import annotations

import numpy as np

COLUMNS = ["path", "label", "score", "topk", "error"]
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
