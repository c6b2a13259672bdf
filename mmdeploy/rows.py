"""What a prediction row holds: the one output format of batch inference, the app, Ray
Serve and the Triton client.

A row is {"path", "label", "score", "topk": [[label, prob], ...], "error"}. Paths are
display names (`data.display_name`) and error messages are one line, so every row can be
written as one physical line (`inference.writers`).
"""

from __future__ import annotations

import numpy as np

COLUMNS = ["path", "label", "score", "topk", "error"]


def prediction_row(name: str, prob: np.ndarray, label: int, class_names: list[str],
                   top_k: int) -> dict:
    order = prob.argsort()[::-1][:top_k]
    return {"path": name, "label": class_names[label], "score": round(float(prob[label]), 6),
            "topk": [[class_names[i], round(float(prob[i]), 6)] for i in order], "error": None}


def error_row(name: str, message: str) -> dict:
    return {"path": name, "label": None, "score": None, "topk": [], "error": message}
