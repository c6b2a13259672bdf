"""Batch inference over the runs of a shared export: `mmdeploy infer --shared DIR INPUTS`.

The pipeline of `batch` (lazy listing, decoding in threads, input order, rows flushed batch
by batch) with a `SharedPredictor`: each image is decoded once and goes through the trunk
once, then through every run's branch. Each image gets one row per run
(`rows.SHARED_COLUMNS`: its "run" field names the run), image by image, the runs in the
predictor's order; an input that cannot be read gets one error row per run, so each run's
rows cover every input. `--resume` keys the rows already written by (path, run): a kill in
the middle of an image's rows leaves it to resume with the runs it still lacks, so the
finished file holds the rows of an uninterrupted run, in the same order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmdeploy.rows import SHARED_COLUMNS, error_row, prediction_row, with_run
from mmdeploy.runtime.shared import SharedPredictor

from .batch import (
    InferenceOptions,
    InferenceSummary,
    Prepared,
    in_batches,
    in_order,
    new_inputs,
    prepare_input,
    write_rows,
)
from .inputs import Entry
from .writers import RowWriter, completed_keys


def run_shared_inference(predictor: SharedPredictor, inputs: Iterable[Entry], output: Path,
                         options: InferenceOptions,
                         progress: Callable[..., tqdm] = tqdm) -> InferenceSummary:
    """Write one row per input and run to `output` (JSONL or CSV by extension) and count
    them (`resumed`: inputs with a row for every run already)."""
    started = time.perf_counter()
    summary = InferenceSummary()
    done = completed_keys(output, SHARED_COLUMNS) if options.resume else set()
    runs = predictor.runs
    finished = {path for path, _ in done if all((path, run) in done for run in runs)}
    todo = new_inputs(inputs, finished, summary)
    prepared = in_order(partial(prepare_input, predictor.preprocessor), todo, options.workers,
                         depth=2 * options.batch_size)
    with (contextlib.closing(prepared),
          RowWriter(output, append=options.resume, columns=SHARED_COLUMNS) as writer,
          progress(desc=f"infer ({predictor.backend}, {len(runs)} runs)", unit="row") as bar):
        for batch in in_batches(prepared, options.batch_size):
            requests = [(entry, prepared, [run for run in runs if (entry.name, run) not in done])
                        for entry, prepared in batch]
            write_rows(shared_rows(predictor, requests, options.top_k), writer, summary, bar,
                       options.fail_fast)
    summary.seconds = time.perf_counter() - started
    return summary


def shared_rows(predictor: SharedPredictor, batch: list[tuple[Entry, Prepared, list[str]]],
                top_k: int) -> list[dict]:
    """Rows for one batch of (input, pixels or its error, the runs it needs a row of): the
    prepared images through the trunk together, each through the branches it needs."""
    ready = [i for i, (_, result, _) in enumerate(batch) if not isinstance(result, str)]
    requests = [(position, run) for position, i in enumerate(ready) for run in batch[i][2]]
    predicted = iter(zip(*predictor.predict_requests(
        np.stack([batch[i][1] for i in ready]), requests), strict=True)) if ready else iter(())
    rows = []
    for entry, result, runs in batch:
        for run in runs:
            if isinstance(result, str):
                row = error_row(entry.name, result)
            else:
                prob, label = next(predicted)
                row = prediction_row(entry.name, prob, label,
                                     predictor.branches[run].class_names, top_k)
            rows.append(with_run(row, run))
    return rows
