"""Batch inference over files: one row per input, written as it goes, resumable.

A row is {"path", "label", "score", "topk": [[label, prob], ...], "error"}. A file that
cannot be decoded gives a row with `error` set and the run goes on. Rows are appended and
flushed batch by batch; `resume` keeps the complete rows already written and skips those
inputs, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .data import Sample, read_image
from .errors import InputError
from .runtime.base import Predictor

COLUMNS = ["path", "label", "score", "topk", "error"]


@dataclass
class InferenceSummary:
    written: int
    skipped: int
    errors: int
    seconds: float


class RowWriter:
    """Appends rows to a JSONL or CSV file; the format follows the extension."""

    def __init__(self, path: Path, append: bool):
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        fresh = not append or not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "w" if fresh else "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        if self.csv and fresh:
            self._write_csv(dict(zip(COLUMNS, COLUMNS, strict=True)))

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.csv:
                self._write_csv({**row, "topk": json.dumps(row["topk"])})
            else:
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def _write_csv(self, row: dict) -> None:
        csv.DictWriter(self.handle, COLUMNS).writerow(row)

    def close(self) -> None:
        self.handle.close()


def completed_paths(path: Path) -> set[str]:
    """Paths already written to `path`; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    text = complete.decode("utf-8")
    if path.suffix.lower() == ".csv":
        return {row["path"] for row in csv.DictReader(io.StringIO(text))}
    return {json.loads(line)["path"] for line in text.splitlines() if line}


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start:start + size]


def predict_rows(predictor: Predictor, samples: list[Sample], top_k: int) -> list[dict]:
    """Rows for one batch, in input order; undecodable files become error rows."""
    rows: list[dict | None] = [None] * len(samples)
    images, positions = [], []
    for position, sample in enumerate(samples):
        try:
            images.append(read_image(sample))
            positions.append(position)
        except InputError as exc:
            rows[position] = {"path": sample.name, "label": None, "score": None, "topk": [],
                              "error": str(exc)}
    if images:
        probs, labels = predictor.predict(images)
        names = predictor.class_names
        for position, prob, label in zip(positions, probs, labels, strict=True):
            order = prob.argsort()[::-1][:top_k]
            rows[position] = {"path": samples[position].name, "label": names[label],
                              "score": round(float(prob[label]), 6),
                              "topk": [[names[i], round(float(prob[i]), 6)] for i in order],
                              "error": None}
    return rows


def run_inference(predictor: Predictor, samples: list[Sample], output: Path, batch_size: int,
                  top_k: int = 5, resume: bool = False,
                  progress: Callable[..., tqdm] = tqdm) -> InferenceSummary:
    started = time.perf_counter()
    done = completed_paths(output) if resume else set()
    todo = [s for s in samples if s.name not in done]
    high = predictor.batch_range[1]
    batch_size = min(batch_size, high) if high else batch_size
    writer = RowWriter(output, append=resume)
    errors = 0
    try:
        with progress(total=len(todo), desc=f"infer ({predictor.backend})", unit="img") as bar:
            for batch in _batches(todo, batch_size):
                rows = predict_rows(predictor, batch, top_k)
                writer.write(rows)
                errors += sum(row["error"] is not None for row in rows)
                bar.update(len(batch))
    finally:
        writer.close()
    return InferenceSummary(len(todo), len(samples) - len(todo), errors,
                            time.perf_counter() - started)
