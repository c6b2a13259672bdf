"""What batch inference reads: a folder (recursive), a glob, a manifest or one file, listed
lazily as `Entry`s (a `Sample` to decode, or a `BadEntry` that becomes one error row)."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import pathlib
from collections.abc import Iterator

from mmdeploy.data import (
    MANIFEST_EXTENSIONS,
    BadEntry,
    Sample,
    display_name,
    manifest_columns,
    manifest_lines,
    resolve_in_manifest,
    unlabeled,
    walk_entries,
)
from mmdeploy.errors import InputError

Entry = Sample | BadEntry


def list_inputs(spec: str, task: str = "classification",
                question: str | None = None) -> Iterator[Entry]:
    """Inputs for batch inference: a folder (recursive), a glob, a manifest or one file.

    Lazy: folders are walked and manifest lines parsed as the consumer asks for them, so a
    million inputs are never held at once. What would stop the whole run (nothing found, a
    manifest without a `path` column or not in UTF-8) is raised here, before anything is
    written. Nothing is decoded: a file that is not an image becomes an error row later, and
    so does a manifest line that names no file.

    A vqa run's (`task`) inputs carry their question (`Entry.question`, as given; judged per
    row later): a manifest's `question` column, or `question` (`--question`) for every
    input of a folder, a glob, a file or a manifest without the column. An input that
    would get no question, or a question for a classification run, stops the run here.
    """
    entries = _entries(spec, task, question)
    first = next(entries, None)
    if first is None:
        raise InputError(f"no input files found in {spec}")
    return itertools.chain([first], entries)


def _entries(spec: str, task: str, question: str | None) -> Iterator[Entry]:
    path = pathlib.Path(spec)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        asks = "question" in manifest_columns(path, lenient=task == "vqa")
        _check_questions(spec, task, question, asks)
        entries = _manifest_entries(path, asks)
    else:
        _check_questions(spec, task, question, column=None)
        entries = _files(spec, path)
    if question is None:
        yield from entries
    else:
        yield from (dataclasses.replace(entry, question=question) for entry in entries)


def _files(spec: str, path: pathlib.Path) -> Iterator[Entry]:
    if path.is_dir():
        yield from walk_entries(path)
    elif path.is_file():
        yield unlabeled(spec)
    else:  # a glob; a literal path that is a broken link or a loop matches itself
        matches = sorted(glob.glob(spec, recursive=True))
        yield from (unlabeled(m) for m in matches if not os.path.isdir(m))


def _check_questions(spec: str, task: str, question: str | None, column: bool | None) -> None:
    """Refuse, before anything is read, inputs whose questions do not fit the run's task:
    `column` says whether a manifest has a `question` column (None: not a manifest)."""
    if task != "vqa":
        if question is not None:
            raise InputError(f"this is a {task} run: it takes images, not questions (drop "
                             "--question)")
        if column:
            raise InputError(f"{spec}: a 'question' column, but this is a {task} run: it "
                             "takes images, not questions")
    elif column and question is not None:
        raise InputError(f"{spec} has its own 'question' column: drop --question, or use a "
                         "manifest without the column")
    elif column is False and question is None:
        raise InputError(f"{spec}: no 'question' column: a vqa run answers an image and a "
                         "question (add the column, or pass --question to ask every image)")
    elif column is None and question is None:
        raise InputError(f"{spec}: a vqa run answers an image and a question: pass "
                         "--question TEXT, or a manifest with a 'question' column")


def _manifest_entries(manifest: pathlib.Path, questions: bool) -> Iterator[Entry]:
    """One entry per manifest line, with its question when `questions`; a line that names
    no usable path is a `BadEntry`."""
    for where, row in manifest_lines(manifest, required=("path",), questions=questions):
        if isinstance(row, str):
            yield BadEntry(display_name(where), f"{display_name(where)}: {row}")
        elif questions:
            yield dataclasses.replace(unlabeled(resolve_in_manifest(manifest, row["path"])),
                                      question=row["question"])
        else:
            yield unlabeled(resolve_in_manifest(manifest, row["path"]))
