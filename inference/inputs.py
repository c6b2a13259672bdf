"""What batch inference reads: a folder (recursive), a glob, a manifest or one file, listed
lazily as `Entry`s (a `Sample` to decode, or a `BadEntry` that becomes one error row)."""

from __future__ import annotations

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
    manifest_lines,
    resolve_in_manifest,
    unlabeled,
    walk_entries,
)
from mmdeploy.errors import InputError

Entry = Sample | BadEntry


def list_inputs(spec: str) -> Iterator[Entry]:
    """Inputs for batch inference: a folder (recursive), a glob, a manifest or one file.

    Lazy: folders are walked and manifest lines parsed as the consumer asks for them, so a
    million inputs are never held at once. What would stop the whole run (nothing found, a
    manifest without a `path` column or not in UTF-8) is raised here, before anything is
    written. Nothing is decoded: a file that is not an image becomes an error row later, and
    so does a manifest line that names no file.
    """
    entries = _entries(spec)
    first = next(entries, None)
    if first is None:
        raise InputError(f"no input files found in {spec}")
    return itertools.chain([first], entries)


def _entries(spec: str) -> Iterator[Entry]:
    path = pathlib.Path(spec)
    if path.is_dir():
        yield from walk_entries(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        yield from _manifest_entries(path)
    elif path.is_file():
        yield unlabeled(spec)
    else:  # a glob; a literal path that is a broken link or a loop matches itself
        matches = sorted(glob.glob(spec, recursive=True))
        yield from (unlabeled(m) for m in matches if not os.path.isdir(m))


def _manifest_entries(manifest: pathlib.Path) -> Iterator[Entry]:
    """One entry per manifest line; a line that names no usable path is a `BadEntry`."""
    for where, row in manifest_lines(manifest, required=("path",)):
        if isinstance(row, str):
            yield BadEntry(display_name(where), f"{display_name(where)}: {row}")
        else:
            yield unlabeled(resolve_in_manifest(manifest, row["path"]))
