"""Batch inference over files: a bounded, ordered pipeline from the input listing to the rows
file (`writers`).

    inputs (listed lazily) -> decode + preprocess in worker threads, at most `depth` images
    in flight -> taken back in input order -> batches predicted on this thread -> rows
    appended and flushed, batch by batch

PIL decodes and resizes with the GIL released, so the threads overlap file decoding with the
model. Memory stays bounded whatever the number of inputs: the listing is a generator and
at most `depth` decoded images wait at once. Rows are written in input order, so a run
killed at any point has written a prefix of its rows; `--resume` keeps that prefix (minus a
torn last line) and skips those inputs, and the finished file has the same rows as an
uninterrupted run. An input listed twice gets one row.

A vqa run's inputs carry their question (`inputs.list_inputs`): a row per image and
question, keyed by both (`input_key`), so the same image may be asked twice; the questions
are checked per row (an empty or non-UTF-8 one is that row's error row) and each batch goes
to `Predictor.predict_question_pixels`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from mmdeploy.data import BadEntry, read_image
from mmdeploy.errors import InputError
from mmdeploy.images import Preprocessor
from mmdeploy.questions import check_question
from mmdeploy.rows import (
    COLUMNS,
    VQA_COLUMNS,
    answer_row,
    error_row,
    prediction_row,
    question_error_row,
    shown_question,
)
from mmdeploy.runtime.base import Predictor

from .inputs import Entry
from .writers import RowWriter, completed_keys

__all__ = ["COLUMNS", "DEFAULT_WORKERS", "InferenceOptions", "InferenceSummary", "input_key",
           "new_inputs", "predict_rows", "prepare_input", "row_columns", "run_inference",
           "write_rows"]

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

Item = TypeVar("Item")
Result = TypeVar("Result")
Prepared = np.ndarray | str  # pixels [3, H, W], or the input's error message


@dataclass(frozen=True)
class InferenceOptions:
    batch_size: int = 32
    top_k: int = 5
    workers: int = DEFAULT_WORKERS  # decode threads; 0 = decode on the calling thread
    resume: bool = False
    fail_fast: bool = False  # raise InputError at the first error row instead of writing it


@dataclass
class InferenceSummary:
    written: int = 0  # rows written by this call, error rows included
    errors: int = 0
    resumed: int = 0  # inputs skipped because the output already had their row
    duplicates: int = 0  # inputs skipped because they were listed before in this call
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def run_inference(predictor: Predictor, inputs: Iterable[Entry], output: Path,
                  options: InferenceOptions,
                  progress: Callable[..., tqdm] = tqdm) -> InferenceSummary:
    """Write one row per input to `output` (JSONL or CSV by extension) and count them."""
    started = time.perf_counter()
    summary = InferenceSummary()
    columns = row_columns(predictor.task)
    done = completed_keys(output, columns) if options.resume else set()
    batch_size = options.batch_size  # the predictor cuts it to its export's batch range
    prepare = partial(prepare_input, predictor.preprocessor)
    todo = new_inputs(inputs, done, summary, partial(input_key, predictor.task))
    prepared = in_order(prepare, todo, options.workers, depth=2 * batch_size)
    with (contextlib.closing(prepared),
          RowWriter(output, append=options.resume, columns=columns) as writer,
          progress(desc=f"infer ({predictor.backend})", unit="img") as bar):
        for batch in in_batches(prepared, batch_size):
            write_rows(predict_rows(predictor, batch, options.top_k), writer, summary, bar,
                       options.fail_fast)
    summary.seconds = time.perf_counter() - started
    return summary


def write_rows(rows: list[dict], writer: RowWriter, summary: InferenceSummary, bar: tqdm,
               fail_fast: bool) -> None:
    """Append a batch's rows and count them; with `fail_fast`, only the rows before its
    first error row, then an `InputError` naming that input."""
    failed = [i for i, row in enumerate(rows) if row["error"] is not None]
    if fail_fast and failed:
        writer.write(rows[: failed[0]])
        summary.written += failed[0]
        raise InputError(f"{rows[failed[0]]['error']}; stopped by --fail-fast, keeping the "
                         f"{summary.written} row(s) before it in {writer.path}")
    writer.write(rows)
    summary.written += len(rows)
    summary.errors += len(failed)
    bar.update(len(rows))
    if summary.errors:
        bar.set_postfix(errors=summary.errors, refresh=False)


def row_columns(task: str) -> list[str]:
    """The columns of a run's rows: `VQA_COLUMNS` for a vqa run, else `COLUMNS`."""
    return VQA_COLUMNS if task == "vqa" else COLUMNS


def input_key(task: str, entry: Entry) -> str | tuple[str, str]:
    """What identifies an input's row: its name, and for a vqa run its question too (as the
    row shows it, `rows.shown_question`)."""
    return (entry.name, shown_question(entry.question)) if task == "vqa" else entry.name


def new_inputs(inputs: Iterable[Entry], done: set, summary: InferenceSummary,
               key: Callable[[Entry], str | tuple[str, str]] = lambda entry: entry.name,
               ) -> Iterator[Entry]:
    """The inputs without a row yet (by `key`), each once; counts what it leaves out."""
    claimed: set = set()
    for entry in inputs:
        name = key(entry)
        if name in done:
            summary.resumed += 1
        elif name in claimed:
            summary.duplicates += 1
        else:
            claimed.add(name)
            yield entry


def prepare_input(preprocessor: Preprocessor, entry: Entry) -> Prepared:
    """Decode and preprocess one input (in a worker thread), or say why it cannot be."""
    if isinstance(entry, BadEntry):
        return entry.error
    try:
        image = read_image(entry)
        preprocessor.check(image, entry.name)
        return preprocessor([image])[0]
    except InputError as exc:
        return str(exc)


def in_order(function: Callable[[Item], Result], items: Iterable[Item], workers: int,
              depth: int) -> Iterator[tuple[Item, Result]]:
    """`(item, function(item))` in input order, computed by `workers` threads at most `depth`
    items ahead of the consumer (the bounded queue); `workers=0` computes them inline."""
    if workers == 0:
        for item in items:
            yield item, function(item)
        return
    pending: deque[tuple[Item, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="mmdeploy-decode") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(function, item)))
                if len(pending) >= depth:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:  # the consumer stopped early (--fail-fast, Ctrl+C): drop queued work
            for _, future in pending:
                future.cancel()


def in_batches(pairs: Iterator[tuple[Item, Result]],
             size: int) -> Iterator[list[tuple[Item, Result]]]:
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_rows(predictor: Predictor, batch: list[tuple[Entry, Prepared]],
                 top_k: int) -> list[dict]:
    """Rows for one batch in input order; the inputs that could not be prepared are error
    rows, the others are predicted together."""
    if predictor.task == "vqa":
        return answer_rows(predictor, batch, top_k)
    rows: list[dict | None] = [
        error_row(entry.name, result) if isinstance(result, str) else None
        for entry, result in batch
    ]
    ready = [i for i, (_, result) in enumerate(batch) if not isinstance(result, str)]
    if ready:
        probs, labels = predictor.predict_pixels(np.stack([batch[i][1] for i in ready]))
        for i, prob, label in zip(ready, probs, labels, strict=True):
            rows[i] = prediction_row(batch[i][0].name, prob, int(label), predictor.class_names,
                                     top_k)
    return rows


def answer_rows(predictor: Predictor, batch: list[tuple[Entry, Prepared]],
                top_k: int) -> list[dict]:
    """`predict_rows` for a vqa run: an input whose image could not be prepared, or whose
    question cannot be asked (`check_question`), is an error row; the others are answered
    together (`Predictor.predict_question_pixels`)."""
    rows: list[dict | None] = [None] * len(batch)
    ready: list[tuple[int, str]] = []  # (position, checked question)
    for i, (entry, result) in enumerate(batch):
        shown = shown_question(entry.question)
        if isinstance(result, str):
            rows[i] = question_error_row(entry.name, shown, result)
            continue
        try:
            ready.append((i, check_question(entry.question)))
        except InputError as exc:
            rows[i] = question_error_row(entry.name, shown, f"{entry.name}: {exc}")
    if ready:
        answers = predictor.predict_question_pixels(
            np.stack([batch[i][1] for i, _ in ready]), [q for _, q in ready])
        for (i, question), prob, label, cut in zip(ready, answers.probs, answers.labels,
                                                   answers.truncated, strict=True):
            rows[i] = answer_row(batch[i][0].name, shown_question(question), prob, int(label),
                                 predictor.class_names, top_k, cut)
    return rows
