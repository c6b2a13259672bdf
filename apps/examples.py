"""Example images for the app, taken from the run's own held-out test split.

They are written as PNG files at start-up (Gradio's examples are files), one per class for
the first classes, named after their true class so a visitor can see when the model is
wrong. Images the adapter never trained on, from the data the run was trained on. A vqa
run's examples are (image, question) pairs of its test split, of distinct answers, each
image named after the pair's true answer (`write_question_examples`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..data import read_image
from ..errors import MmdeployError
from ..runs import RunConfig


def write_examples(run: RunConfig, out: Path, count: int = 6) -> list[Path]:
    """Write up to `count` test-split images of distinct classes to `out`; raises
    `MmdeployError` when the run's data is not readable here (e.g. a folder since moved)."""
    splits = run.splits()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[int] = set()
    for sample in splits.test:
        if sample.label in seen:
            continue
        seen.add(sample.label)
        name = re.sub(r"[^\w.-]+", "_", splits.class_names[sample.label])
        path = out / f"{name}.png"
        if path.exists():  # two class names that differ only in punctuation
            continue
        read_image(sample).save(path)
        written.append(path)
        if len(written) == count:
            break
    return written


def examples_or_reason(run: RunConfig, out: Path, count: int = 6) -> tuple[list[Path], str]:
    """The example files, or none and the reason (the app serves without examples)."""
    try:
        return write_examples(run, out, count), ""
    except MmdeployError as exc:
        return [], f"no examples: {exc}"


def write_question_examples(run: RunConfig, out: Path,
                            count: int = 6) -> list[tuple[Path, str]]:
    """A vqa run's `write_examples`: up to `count` (image file, question) pairs of its test
    split with distinct answers, each image named `<answer>-<n>.png`."""
    splits = run.splits()
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    seen: set[int] = set()
    for sample in splits.test:
        if sample.label in seen or not sample.question:
            continue
        seen.add(sample.label)
        answer = re.sub(r"[^\w.-]+", "_", splits.class_names[sample.label])
        path = out / f"{answer}-{len(written)}.png"
        read_image(sample).save(path)
        written.append((path, sample.question))
        if len(written) == count:
            break
    return written


def question_examples_or_reason(run: RunConfig, out: Path,
                                count: int = 6) -> tuple[list[tuple[Path, str]], str]:
    """The (image, question) examples, or none and the reason."""
    try:
        return write_question_examples(run, out, count), ""
    except MmdeployError as exc:
        return [], f"no examples: {exc}"
