"""Batch inference on Ray Data (DESIGN section 9): `mmdeploy infer RUN INPUTS --engine ray`.

    inputs listed on the driver, minus rows already done and duplicates
      -> decode + preprocess: `map_batches` tasks (stateless, on any node)
      -> predict: `map_batches` on a fixed pool of `PredictorActor`s, one `Predictor` each,
         loaded once for the run (one GPU per actor on a GPU backend)
      -> rows streamed back to the driver as they finish, appended and flushed per batch

Each step is the local engine's own (`inference.prepare_input` decodes,
`inference.predict_rows` builds the rows with `rows.prediction_row` / `rows.error_row`); the
actors send each row back as JSON text and the driver writes it with the same `RowWriter`,
so a row is the bytes `--engine local` writes for that file. Only the order differs: Ray
finishes batches in any order, so rows are keyed by path, never by position. A killed run
has written whole rows plus at most a torn last line, which is all `--resume`
(`writers.completed_keys`) needs.

On a cluster, the decode tasks and the actors open the inputs and the run directory at the
paths the driver listed (a shared filesystem, or the same copy on every node); only pixels
and rows travel through Ray.

A vqa run's inputs carry their questions through the pipeline (a `question` column beside
`path`): each is checked on the driver (`check_question`), so a question that cannot be
asked is that input's error row and only checked text travels; rows are keyed by path and
question.

Parquet output is written by the driver too (one row group per batch), into NAME.partial,
renamed to NAME when the run completes: a file without its footer is unreadable, so a
Parquet output cannot be resumed and a stopped run leaves no half-written NAME.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmdeploy.data import BadEntry, Sample
from mmdeploy.errors import ConfigError, InputError
from mmdeploy.images import Preprocessor
from mmdeploy.questions import check_question
from mmdeploy.rows import COLUMNS, shown_question

from .batch import (
    InferenceSummary,
    input_key,
    new_inputs,
    predict_rows,
    prepare_input,
    row_columns,
    write_rows,
)
from .inputs import Entry
from .ray_cluster import PredictorSpec, RayOptions, RaySession, gpus_per_worker, ray_session
from .writers import RowWriter, completed_keys

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class RayInferenceOptions:
    batch_size: int = 32
    top_k: int = 5
    actors: int | None = None  # None: one per GPU on a GPU backend, else one per node
    resume: bool = False
    fail_fast: bool = False


class PredictorActor:
    """One predictor per actor for the whole run; a batch of decoded inputs in, one JSON row
    per input out. Lives in the installed package because Ray's workers import it by name."""

    def __init__(self, spec: PredictorSpec, top_k: int, threads: int | None = None):
        self.predictor = spec.load_predictor(threads)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [(Sample(str(name), "", question=str(question)), str(error) if error else pixels)
                 for name, error, pixels, question in zip(batch["path"], batch["error"],
                                                          batch["pixels"], batch["question"],
                                                          strict=True)]
        rows = predict_rows(self.predictor, pairs, self.top_k)
        return {"row": np.array([json.dumps(row, ensure_ascii=False) for row in rows],
                                dtype=object)}


def decode_batch(batch: dict[str, np.ndarray],
                 preprocessor: Preprocessor) -> dict[str, np.ndarray]:
    """Decode and preprocess a batch of inputs (a Ray task): pixels, or the input's error
    message (then zeros stand in for its pixels, which are never predicted)."""
    pixels = np.zeros((len(batch["path"]), 3, *preprocessor.image_size), dtype=np.float32)
    errors = []
    for index, (name, source, error) in enumerate(zip(batch["path"], batch["source"],
                                                      batch["error"], strict=True)):
        entry = BadEntry(str(name), str(error)) if error else Sample(str(name), str(source))
        result = prepare_input(preprocessor, entry)
        if isinstance(result, str):
            errors.append(result)
        else:
            pixels[index] = result
            errors.append("")
    return {"path": batch["path"], "error": np.array(errors, dtype=object), "pixels": pixels,
            "question": batch["question"]}


def infer_on_ray(run_path: str | os.PathLike, backend: str, inputs: Iterable[Entry],
                 output: Path, options: RayInferenceOptions, address: str | None,
                 log: Callable[[str], None], precision: str = "fp32") -> InferenceSummary:
    """`mmdeploy infer --engine ray`: check the options, load the predictor once on the
    driver (`PredictorSpec`), then start or join Ray (`ray_cluster`) for the run."""
    check_output(output, options)
    spec = PredictorSpec.load(run_path, backend, precision)
    log(f"backend: {spec.description}")
    with ray_session(RayOptions(address=address)) as session:
        log(session.describe())
        return run_ray_inference(spec, inputs, output, options, session)


def check_output(output: Path, options: RayInferenceOptions) -> None:
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"{output}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
    if options.resume and output.suffix.lower() == ".parquet":
        raise ConfigError(f"{output}: --resume needs a .jsonl or .csv output (a Parquet file "
                          "is unreadable until it is closed)")


def run_ray_inference(spec: PredictorSpec, inputs: Iterable[Entry], output: Path,
                      options: RayInferenceOptions, session: RaySession,
                      progress: Callable[..., tqdm] = tqdm) -> InferenceSummary:
    """Write one row per input to `output` (JSONL, CSV or Parquet by extension) through a
    Ray Data pipeline on `session`, and count them."""
    started = time.perf_counter()
    check_output(output, options)
    summary = InferenceSummary()
    columns = row_columns(spec.task)
    done = completed_keys(output, columns) if options.resume else set()
    todo = [_item(entry, spec.task)
            for entry in new_inputs(inputs, done, summary, partial(input_key, spec.task))]
    with (_writer(output, append=options.resume, columns=columns) as writer,
          progress(desc=f"infer ({spec.backend}, ray)", unit="img", total=len(todo)) as bar):
        for rows in _stream(todo, spec, options, session):
            write_rows(rows, writer, summary, bar, options.fail_fast)
    summary.seconds = time.perf_counter() - started
    return summary


def actor_resources(spec: PredictorSpec, session: RaySession,
                    actors: int | None) -> tuple[int, float, float, int | None]:
    """(pool size, CPUs, GPUs, model threads) per actor. By default one actor per GPU on a
    GPU backend, else one per node (ONNX Runtime's threads already use every core of a
    node). On CPU, the actors of a node share its cores: each runs the model on its share
    (N actors on a node each taking every core would slow all of them down).

    The actors together reserve at most half the cluster's CPUs: Ray does not start a decode
    task without a free CPU, so a pool holding every CPU (2 actors at 1 CPU on 2 cores)
    would wait forever for input that never comes, without a word. An actor reserves at
    most half a CPU (a reservation is bookkeeping: ONNX Runtime's threads use the node's
    cores whatever it says), which also keeps it unlike the decode tasks' 1 CPU: Ray Data
    fuses steps with equal resources, and decoding inside the actors would leave the model
    waiting on it instead of overlapping the two."""
    size = actors or (max(1, int(session.gpus)) if spec.gpu else session.nodes)
    gpus = gpus_per_worker(spec, session, size, "actor")
    per_node = -(-size // max(1, session.nodes))
    threads = None if spec.gpu else max(1, int(session.cpus // max(1, session.nodes)) // per_node)
    return size, min(0.5, session.cpus / (2 * size)), gpus, threads


def _stream(todo: list[dict], spec: PredictorSpec, options: RayInferenceOptions,
            session: RaySession) -> Iterator[list[dict]]:
    """The rows of `todo`, a batch at a time, in the order the actors finish them."""
    if not todo:
        return
    import ray.data

    size, cpus, gpus, threads = actor_resources(spec, session, options.actors)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows written, not blocks
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"
    dataset = (
        ray.data.from_items(todo, override_num_blocks=-(-len(todo) // options.batch_size))
        .map_batches(decode_batch, batch_size=options.batch_size, batch_format="numpy",
                     fn_kwargs={"preprocessor": spec.preprocessor})
        .map_batches(PredictorActor, batch_size=options.batch_size, batch_format="numpy",
                     fn_constructor_kwargs={"spec": spec, "top_k": options.top_k,
                                            "threads": threads},
                     compute=ray.data.ActorPoolStrategy(size=size), num_cpus=cpus,
                     num_gpus=gpus)
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield [json.loads(text) for text in batch["row"]]


def _item(entry: Entry, task: str) -> dict:
    """An input as a Ray Data row: its name, the file to decode, or why there is none; for a
    vqa run its question, checked here (text that is not UTF-8 cannot travel as a string):
    one that cannot be asked is the input's error."""
    question = shown_question(entry.question)
    if isinstance(entry, BadEntry):
        return {"path": entry.name, "source": "", "error": entry.error, "question": question}
    item = {"path": entry.name, "source": os.fspath(entry.image), "error": "",
            "question": question}
    if task == "vqa":
        try:
            item["question"] = check_question(entry.question)
        except InputError as exc:
            item["error"] = f"{entry.name}: {exc}"
    return item


def _writer(output: Path, append: bool, columns: list[str]) -> RowWriter | ParquetRows:
    if output.suffix.lower() == ".parquet":
        return ParquetRows(output, columns)
    return RowWriter(output, append=append, columns=columns)


class ParquetRows:
    """`RowWriter`'s interface for a Parquet file: one row group per `write`, written to
    NAME.partial and renamed to NAME on close. `topk` is a list of {label, prob} structs."""

    def __init__(self, path: Path, columns: list[str] = COLUMNS):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.columns = columns
        self.partial = path.with_name(path.name + ".partial")
        topk = pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float64())]))
        types = {"score": pa.float64(), "topk": topk, "truncated": pa.bool_()}
        self.schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])
        self.writer = pq.ParquetWriter(self.partial, self.schema)

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        if not rows:
            return
        columns = {name: [row[name] for row in rows] for name in self.columns}
        columns["topk"] = [[{"label": label, "prob": prob} for label, prob in row["topk"]]
                           for row in rows]
        self.writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))

    def close(self, complete: bool = True) -> None:
        self.writer.close()
        if complete:  # an interrupted run keeps its rows in NAME.partial, not in NAME
            self.partial.replace(self.path)

    def __enter__(self) -> ParquetRows:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close(complete=exc_type is None)
