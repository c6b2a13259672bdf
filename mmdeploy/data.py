"""Labelled datasets (bundled demo set, image folders, CSV/JSONL manifests, easy-VQA),
few-shot splits and the list of inputs for batch inference.

The data chooses the task: `classification` (image -> class) for the demo set, an image
folder or a `path,label` manifest; `vqa` (image + question -> answer) for `easy-vqa` (the
`easy-vqa` package, extra `vqa`) or a `path,question,answer` manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from PIL import Image

from .errors import ConfigError, InputError
from .images import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".csv", ".jsonl")
DEMO = "demo"
EASY_VQA = "easy-vqa"
TASKS = ("classification", "vqa")
_DEMO_FILE = "animal_silhouettes.npz"


@dataclass(frozen=True)
class Sample:
    """One image. Equality and hashing use everything but the pixels (`name` is the id)."""

    name: str  # the file path as given/resolved, or "demo:<index>"
    image: str | np.ndarray = field(compare=False, repr=False)  # a path, or uint8 pixels
    label: int = -1  # -1 when unknown (inference inputs)
    caption: str | None = None
    question: str | None = None  # vqa: the question asked of this image (`label`: the answer)


@dataclass
class LabeledSet:
    """`class_names` are the answers of a vqa set; `test`, when the data comes with its own
    test split (easy-VQA), is that split and `samples` are the training pool."""

    samples: list[Sample]
    class_names: list[str]
    task: str = "classification"
    test: list[Sample] | None = None


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    class_names: list[str]
    task: str = "classification"


def demo_path() -> pathlib.Path:
    """Path of the bundled demo set inside the installed package."""
    return pathlib.Path(str(resources.files("mmdeploy.assets") / _DEMO_FILE))


def read_image(sample: Sample) -> Image.Image:
    """Decode a sample to RGB; errors name `sample.name`."""
    return load_image(sample.image, name=sample.name)


# --------------------------------------------------------------------------- labelled data


def load_labeled(source: str) -> LabeledSet:
    """Load `demo`, a folder with one subfolder per class, or a `.csv`/`.jsonl` manifest."""
    if source == DEMO:
        return _load_demo()
    if source == EASY_VQA:
        return _load_easy_vqa()
    path = pathlib.Path(source)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise InputError(f"{source}: no such file or folder")
    if path.suffix.lower() not in MANIFEST_EXTENSIONS:
        raise InputError(f"{source}: expected '{DEMO}', an image folder or a .csv/.jsonl manifest")
    return _load_manifest(path)


def data_task(source: str) -> str:
    """The task `source` holds, read cheaply (a manifest's columns), without loading it."""
    if source == EASY_VQA:
        return "vqa"
    path = pathlib.Path(source)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return "vqa" if "question" in manifest_columns(path) else "classification"
    return "classification"


def manifest_columns(path: pathlib.Path, lenient: bool = False) -> list[str]:
    """A CSV's header, or the keys of a JSONL manifest's first object, read from the start of
    the file only (`lenient`: as `manifest_lines(questions=True)` decodes it). A file that
    cannot be read, or is not UTF-8 where it was read, is `_read_text`'s error."""
    errors = "surrogateescape" if lenient else "strict"
    try:
        with open(path, encoding="utf-8-sig", errors=errors, newline="") as handle:
            if path.suffix.lower() == ".csv":
                return next(csv.reader(handle, skipinitialspace=True), [])
            line = next((line for line in handle if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        _read_text(path, lenient)  # raises the one-line error naming the file (and byte)
        raise
    except csv.Error:
        return []
    try:
        row = json.loads(line) if line else None
    except json.JSONDecodeError:
        return []
    return list(row) if isinstance(row, dict) else []


def _load_manifest(manifest: pathlib.Path) -> LabeledSet:
    if data_task(str(manifest)) == "vqa":
        return _load_vqa_manifest(manifest)
    rows = [
        (where, resolve_in_manifest(manifest, row["path"]), row)
        for where, row in _manifest_rows(manifest, required=("path", "label"))
    ]
    if not rows:
        raise InputError(f"{manifest}: manifest has no rows")
    for where, image, _ in rows:  # fail before training starts, not in the middle of an epoch
        if not image.is_file():
            raise InputError(f"{where}: {image}: no such file")
    class_names = sorted({row["label"] for _, _, row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    samples = [
        Sample(str(image), str(image), index[row["label"]], row.get("caption"))
        for _, image, row in rows
    ]
    return LabeledSet(samples, class_names)


def _load_vqa_manifest(manifest: pathlib.Path) -> LabeledSet:
    """A `path,question,answer` manifest: one row per question (an image may have many)."""
    rows = [
        (where, resolve_in_manifest(manifest, row["path"]), row)
        for where, row in _manifest_rows(manifest, required=("path", "question", "answer"))
    ]
    if not rows:
        raise InputError(f"{manifest}: manifest has no rows")
    for where, image, _ in rows:
        if not image.is_file():
            raise InputError(f"{where}: {image}: no such file")
    answers = sorted({row["answer"] for _, _, row in rows})
    index = {name: i for i, name in enumerate(answers)}
    samples = [Sample(str(image), str(image), index[row["answer"]], question=row["question"])
               for _, image, row in rows]
    return LabeledSet(samples, answers, task="vqa")


def _load_easy_vqa() -> LabeledSet:
    """easy-VQA (MIT, the `easy-vqa` package): its train split is the training pool (train
    and validation are drawn from it), its test split the test set."""
    try:
        import easy_vqa
    except ImportError:
        raise InputError(f"--data {EASY_VQA} needs the easy-vqa package: pip install "
                         "'mm-peft-deploy[vqa]'") from None
    answers = sorted(easy_vqa.get_answers())
    index = {name: i for i, name in enumerate(answers)}

    def split(questions, image_paths) -> list[Sample]:
        return [Sample(image_paths[image], image_paths[image], index[answer], question=question)
                for question, answer, image in zip(*questions, strict=True)]

    return LabeledSet(split(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
                      answers, task="vqa",
                      test=split(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()))


def _load_demo() -> LabeledSet:
    with np.load(demo_path(), allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
        class_names = [str(name) for name in archive["class_names"]]
    samples = [Sample(f"demo:{i}", images[i], int(labels[i])) for i in range(len(labels))]
    return LabeledSet(samples, class_names)


def _load_folder(root: pathlib.Path) -> LabeledSet:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    if not class_dirs:
        raise InputError(f"{root}: no class subfolders (expected one subfolder per class)")
    samples = []
    for label, class_dir in enumerate(class_dirs):
        files = [p for p in _walk_files(class_dir) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise InputError(f"{class_dir}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
        samples += [Sample(str(p), str(p), label) for p in files]
    return LabeledSet(samples, [p.name for p in class_dirs])


# --------------------------------------------------------------------------- splits


def make_splits(
    data: LabeledSet, shots: int, val_per_class: int, test_per_class: int, seed: int
) -> Splits:
    """Split each class into test, val and a train pool; take `shots` of the pool (0 = all).

    The order within a class is a permutation keyed by `seed` and each sample's name, so the
    split does not depend on `shots` (the 4-shot set is a subset of the 16-shot set) nor on
    the numpy or Python version. Lists are class-major, in that permuted order.
    """
    if data.task == "vqa":
        return make_vqa_splits(data, shots, val_per_class, test_per_class, seed)
    for option, value in (
        ("shots", shots),
        ("val_per_class", val_per_class),
        ("test_per_class", test_per_class),
    ):
        if value < 0:
            raise ConfigError(f"{option} must be >= 0, got {value}")
    by_class: list[list[Sample]] = [[] for _ in data.class_names]
    for sample in data.samples:
        if not 0 <= sample.label < len(by_class):
            raise InputError(f"{sample.name}: label {sample.label} is not a class index")
        by_class[sample.label].append(sample)
    needed = test_per_class + val_per_class + max(shots, 1)
    short = [
        f"{data.class_names[c]!r} has {len(members)}"
        for c, members in enumerate(by_class)
        if len(members) < needed
    ]
    if short:
        raise InputError(
            f"too few images per class: {', '.join(short)}; need {needed} "
            f"(test {test_per_class} + val {val_per_class} + train {max(shots, 1)})"
        )
    splits = Splits([], [], [], list(data.class_names))
    for members in by_class:
        ordered = sorted(members, key=lambda s: _shuffle_key(seed, s.name))
        pool = ordered[test_per_class + val_per_class :]
        splits.test += ordered[:test_per_class]
        splits.val += ordered[test_per_class : test_per_class + val_per_class]
        splits.train += pool[:shots] if shots else pool
    return splits


def make_vqa_splits(
    data: LabeledSet, shots: int, val_per_answer: int, test_per_answer: int, seed: int
) -> Splits:
    """Questions split by image, so that no image is in two splits.

    Images are taken in a seeded order (keyed by `seed` and the image's name). An image goes
    to test (only when `data` has no test split of its own; else that split is the test set,
    whole) when some answer of its questions still needs test questions, then likewise to
    validation: there only the questions whose answer still needs one are kept (its others
    are in no split), so each answer has `test_per_answer` and `val_per_answer` questions, or
    the data is refused. Every question of the other images is in the training pool, of
    which `shots` questions per answer are taken (0 = all) in a seeded order, so the 4-shot
    set is a subset of the 16-shot set.
    """
    for option, value in (("shots", shots), ("val_per_class", val_per_answer),
                          ("test_per_class", test_per_answer)):
        if value < 0:
            raise ConfigError(f"{option} must be >= 0, got {value}")
    by_image: dict[str, list[Sample]] = {}
    for sample in data.samples:
        if not 0 <= sample.label < len(data.class_names):
            raise InputError(f"{sample.name}: answer {sample.label} is not an answer index")
        by_image.setdefault(sample.name, []).append(sample)
    images = sorted(by_image, key=lambda name: _shuffle_key(seed, name))
    held_out: dict[str, list[Sample]] = {}
    quotas = [("val", val_per_answer)]
    if data.test is None:
        quotas.insert(0, ("test", test_per_answer))
    for split_name, quota in quotas:
        counts = [0] * len(data.class_names)
        taken: list[Sample] = []
        kept: list[str] = []
        for position, image in enumerate(images):
            if all(count >= quota for count in counts):
                kept += images[position:]
                break
            needed = [s for s in by_image[image] if counts[s.label] < quota]
            if not needed:  # answers nothing still needed: stays in the training pool
                kept.append(image)
                continue
            for sample in needed:
                if counts[sample.label] < quota:
                    counts[sample.label] += 1
                    taken.append(sample)
        images = kept
        short = [f"{name!r} has {count}" for name, count in zip(data.class_names, counts,
                                                                 strict=True) if count < quota]
        if short:
            raise InputError(f"too few questions per answer for {split_name}: "
                             f"{', '.join(short)}; need {quota}")
        held_out[split_name] = taken
    pool = sorted((s for image in images for s in by_image[image]),
                  key=lambda s: _shuffle_key(seed, f"{s.name}\0{s.question}"))
    if shots:
        counts = [0] * len(data.class_names)
        train = []
        for sample in pool:
            if counts[sample.label] < shots:
                counts[sample.label] += 1
                train.append(sample)
        short = [f"{name!r} has {count}" for name, count in zip(data.class_names, counts,
                                                                 strict=True) if count < shots]
        if short:
            raise InputError(f"too few training questions per answer: {', '.join(short)}; "
                             f"need {shots}")
    else:
        train = pool
    test = data.test if data.test is not None else held_out["test"]
    return Splits(train, held_out["val"], list(test), list(data.class_names), task="vqa")


def _shuffle_key(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


# --------------------------------------------------------------------------- listing files


@dataclass(frozen=True)
class BadEntry:
    """An input that names no file to decode (a bad manifest line, a folder that cannot be
    listed): it becomes one error row, keyed by `name` like any other row."""

    name: str  # "list.csv:7" or the folder
    error: str
    question: object = None  # a vqa input's question as given, if the line had one


def display_name(path: str | os.PathLike) -> str:
    """`path` as one line of valid UTF-8 text: a file name's undecodable bytes become
    `\\xNN` (as `ls` shows them) and control characters are escaped, so that rows, error
    messages and the resume key stay one printable line."""
    text = os.fspath(path)
    try:
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON manifest: no file has that name
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL_ESCAPES)


# C0 controls, DEL, what Python's str.splitlines() also breaks lines at, and the
# bidirectional controls that make a name display as another (U+202E shows "gpj.exe" as
# "exe.jpg"): every place a name is shown gets them escaped.
_CONTROL_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, 0x85)},
    **{code: f"\\u{code:04x}" for code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                                             *range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}


def walk_entries(root: pathlib.Path) -> Iterator[Sample | BadEntry]:
    """Every non-hidden entry under `root` that is not a folder, depth first, names sorted
    within each folder (the order of `sorted()` on the paths).

    Anything but a folder is an input, so a broken link, a symlink loop or a FIFO gets its
    own error row instead of vanishing. Folder symlinks are followed once: a folder already
    visited (same device and inode) is not entered again, which ends folder loops. A folder
    that cannot be listed is one error row.
    """
    seen: set[tuple[int, int]] = set()

    def walk(folder: pathlib.Path) -> Iterator[Sample | BadEntry]:
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                return
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted((e for e in listing if not _hidden(e.name)),
                                 key=lambda e: e.name)
        except OSError as exc:
            yield BadEntry(display_name(folder),
                           f"{display_name(folder)}: cannot list folder "
                           f"({exc.strerror or exc})")
            return
        for entry in entries:
            if _is_dir(entry):
                yield from walk(pathlib.Path(entry.path))
            else:
                yield unlabeled(entry.path)

    yield from walk(root)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for a broken link or a loop
    except OSError:
        return False


# --------------------------------------------------------------------------- helpers


def unlabeled(path: str | os.PathLike) -> Sample:
    return Sample(display_name(path), os.fspath(path))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Every regular, non-hidden file under `root`, sorted (for labelled folders)."""
    files = []
    for entry in walk_entries(root):
        if isinstance(entry, BadEntry):
            raise InputError(entry.error)
        if os.path.isfile(entry.image):
            files.append(pathlib.Path(entry.image))
    return files


def resolve_in_manifest(manifest: pathlib.Path, image: str) -> pathlib.Path:
    """A manifest's relative paths are relative to the manifest's folder."""
    return manifest.parent / image


def _manifest_rows(
    path: pathlib.Path, required: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (`file:line`, row) with the required keys; any bad line is an error."""
    for where, row in manifest_lines(path, required):
        if isinstance(row, str):
            raise InputError(f"{where}: {row}")
        yield where, row


def manifest_lines(
    path: pathlib.Path, required: tuple[str, ...], questions: bool = False
) -> Iterator[tuple[str, dict[str, str] | str]]:
    """Yield (`file:line`, row with the required keys and, when given, `caption`), or
    (`file:line`, what is wrong with that line). A manifest that is unusable as a whole (not
    UTF-8, a CSV without a required column, broken CSV quoting) raises `InputError`.

    With `questions` (the inputs of a vqa run), each row also keeps its `question` as given
    (None where it has none; `questions.check_question` judges it per row), and bytes that
    are not UTF-8 are kept as surrogates instead of refusing the manifest: a bad question
    is one error row, and a file name in any encoding still names its file."""
    text = _read_text(path, lenient=questions)
    is_csv = path.suffix.lower() == ".csv"
    rows = _csv_rows(path, text, required) if is_csv else _jsonl_rows(path, text)
    for where, row in rows:
        checked = row if isinstance(row, str) else _check_row(row, required)
        if questions and isinstance(checked, dict):
            checked["question"] = row.get("question")
        yield where, checked


def _check_row(row: dict, required: tuple[str, ...]) -> dict[str, str] | str:
    for key in required:
        value = row.get(key)
        if not isinstance(value, str) or not value:
            return f"{key!r} must be a non-empty string, got {value!r}"
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        return f"'caption' must be a string, got {caption!r}"
    return {k: row[k] for k in (*required, "caption") if row.get(k)}


def _read_text(path: pathlib.Path, lenient: bool = False) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig", "surrogateescape" if lenient else "strict")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text at byte {exc.start} (manifests must be UTF-8)"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _csv_rows(
    path: pathlib.Path, text: str, required: tuple[str, ...]
) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        columns = reader.fieldnames or []
        for key in required:
            if key not in columns:
                raise InputError(
                    f"{path}: missing required column {key!r} (columns: "
                    f"{', '.join(columns) or 'none'})"
                )
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: bad CSV ({exc})") from None


def _jsonl_rows(path: pathlib.Path, text: str) -> Iterator[tuple[str, dict | str]]:
    # split on newlines only: str.splitlines() would also cut at U+2028 inside a JSON string
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, f"bad JSON ({exc.msg})"
            continue
        if not isinstance(row, dict):
            yield where, f"expected a JSON object, got {type(row).__name__}"
            continue
        yield where, row
