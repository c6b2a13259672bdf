"""The rows file of batch inference: appending rows, reading them back.

One JSON object per line (`.jsonl`) or one CSV record (`.csv`, `topk` as JSON text), each
row one physical line (`rows`). So a process killed mid-write can only leave a torn *last*
line, and `completed_keys` cuts exactly that off before `--resume` appends.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mmdeploy.errors import InputError
from mmdeploy.rows import COLUMNS


class RowWriter:
    """Appends rows to a JSONL or CSV file (the format follows the extension), flushed after
    every `write` so that a killed run loses at most the batch it was writing. `columns`:
    `SHARED_COLUMNS` for the rows of several runs."""

    def __init__(self, path: Path, append: bool, columns: list[str] = COLUMNS):
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        fresh = not append or not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "w" if fresh else "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._csv_writer = csv.DictWriter(self.handle, columns, lineterminator="\n")
        if self.csv and fresh:
            self._csv_writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.csv:
                self._csv_writer.writerow({**row, "topk": json.dumps(row["topk"])})
            else:
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def completed_keys(path: Path, columns: list[str] = COLUMNS) -> set[str | tuple[str, str]]:
    """Keys of the complete rows in `path`: each row's path, or (path, run) for the rows of
    several runs (`columns` = `SHARED_COLUMNS`), or (path, question) for a vqa run's
    (`VQA_COLUMNS`: an image may be asked several questions). A torn last line (a kill
    mid-write) is cut off.

    Streams the file, so resuming a million-row output does not hold its text in memory.
    A line that is not a row of ours is an error naming the line: appending to someone
    else's file would mix two formats.
    """
    if not path.exists():
        return set()
    keys: set[str | tuple[str, str]] = set()
    is_csv = path.suffix.lower() == ".csv"
    complete = 0
    with open(path, "r+b") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                break
            complete += len(line)
            if is_csv and number == 1:
                _check_header(path, line, columns)
            else:
                keys.add(_row_key(path, number, line, is_csv, columns))
        if complete < handle.seek(0, 2):
            handle.truncate(complete)
    return keys


def _check_header(path: Path, line: bytes, columns: list[str]) -> None:
    if line.rstrip(b"\r\n").decode("utf-8", "replace") != ",".join(columns):
        raise InputError(f"{path}:1: not a header written by `mmdeploy infer{_shared(columns)}` "
                         f"(expected {','.join(columns)}); pass --overwrite to start again")


def _row_key(path: Path, number: int, line: bytes, is_csv: bool,
             columns: list[str]) -> str | tuple[str, str]:
    """The row's path, or (path, run) when `columns` has a run, or (path, question) when it
    has a question; a row with a run or a question in a file of rows without, or the other
    way round, is not one of ours."""
    try:
        text = line.decode("utf-8")
        row = dict(zip(columns, next(csv.reader([text])), strict=False)) if is_csv \
            else json.loads(text)
        if any((column in row) != (column in columns) for column in ("run", "question")):
            raise ValueError("another kind of rows")
        key = tuple(row[column] for column in ("path", "run") if column in columns)
        if not all(isinstance(value, str) and value for value in key):
            raise ValueError("no path")
        if "question" in columns:  # "" where a line had no question to show
            if not isinstance(row["question"], str):
                raise ValueError("no question")
            key = (*key, row["question"])
        return key if len(key) > 1 else key[0]
    except (ValueError, KeyError, IndexError, TypeError, csv.Error, StopIteration):
        raise InputError(f"{path}:{number}: not a row written by `mmdeploy infer"
                         f"{_shared(columns)}`; pass --overwrite to start again") from None


def _shared(columns: list[str]) -> str:
    return " --shared" if "run" in columns else ""
