"""Datasets, few-shot splits and inference inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import (
    LabeledSet,
    Sample,
    demo_path,
    load_labeled,
    make_splits,
    read_image,
)
from mmdeploy.errors import ConfigError, InputError
from mmdeploy.inference.inputs import list_inputs
from mmdeploy.runs import RunConfig

DEMO_CLASSES = [
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
]


def _image(path, value: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), (value, value, value)).save(path)
    return path


def _names(samples: list[Sample]) -> list[str]:
    return [s.name for s in samples]


def _input_error(function, *args) -> str:
    with pytest.raises(InputError) as info:
        function(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def demo() -> LabeledSet:
    return load_labeled("demo")


# --------------------------------------------------------------------------- demo set


def test_demo_set(demo):
    assert demo_path().is_file()
    assert demo.class_names == DEMO_CLASSES
    assert len(demo.samples) == 10_000
    assert np.bincount([s.label for s in demo.samples]).tolist() == [1000] * 10
    first = demo.samples[0]
    assert first.name == "demo:0"
    assert first.image.dtype == np.uint8 and first.image.shape == (28, 28)
    image = read_image(first)
    assert image.mode == "RGB" and image.size == (28, 28)


# --------------------------------------------------------------------------- splits


def test_split_sizes_and_disjointness(demo):
    splits = make_splits(demo, shots=4, val_per_class=20, test_per_class=50, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 200, 500)
    assert splits.class_names == DEMO_CLASSES
    train, val, test = (set(_names(part)) for part in (splits.train, splits.val, splits.test))
    assert not (train & val) and not (train & test) and not (val & test)
    for part in (splits.train, splits.val, splits.test):
        counts = np.bincount([s.label for s in part], minlength=10)
        assert len(set(counts.tolist())) == 1  # balanced


def test_splits_are_deterministic_and_seeded(demo):
    first = make_splits(demo, 4, 20, 50, seed=0)
    again = make_splits(demo, 4, 20, 50, seed=0)
    other = make_splits(demo, 4, 20, 50, seed=1)
    assert _names(first.train) == _names(again.train) and _names(first.test) == _names(again.test)
    assert _names(first.train) != _names(other.train)


def test_few_shot_sets_are_nested_and_eval_sets_do_not_move(demo):
    four, sixteen, full = (make_splits(demo, k, 20, 50, seed=3) for k in (4, 16, 0))
    assert set(_names(four.train)) < set(_names(sixteen.train)) < set(_names(full.train))
    assert len(full.train) == 10 * (1000 - 70)
    for split in (sixteen, full):
        assert _names(split.val) == _names(four.val) and _names(split.test) == _names(four.test)


def test_split_refuses_small_classes_and_negative_counts(demo):
    birds = [s for s in demo.samples if s.label == 1]
    small = LabeledSet(demo.samples[:5] + birds[:20] + demo.samples[2000:2100], DEMO_CLASSES[:3])
    message = _input_error(make_splits, small, 4, 20, 10, 0)
    assert message == (
        "too few images per class: 'bear' has 5, 'bird' has 20; need 34 "
        "(test 10 + val 20 + train 4)"
    )
    with pytest.raises(ConfigError, match="shots"):
        make_splits(demo, -1, 20, 50, 0)
    unlabeled = LabeledSet([Sample("x.png", "x.png")], ["cat"])
    assert (
        _input_error(make_splits, unlabeled, 0, 0, 0, 0) == "x.png: label -1 is not a class index"
    )


def _run_on(data: DataConfig) -> RunConfig:
    return RunConfig(adapter="linear-probe", adapter_config={}, backbone=BackboneConfig(),
                     backbone_identity={}, data=data, train=TrainConfig(),
                     class_names=DEMO_CLASSES)


def test_a_run_draws_the_split_its_data_config_describes(demo):
    data = DataConfig(shots=4, val_per_class=20, test_per_class=50, split_seed=3)
    expected = make_splits(demo, 4, 20, 50, seed=3)
    for splits in (data.splits(), _run_on(data).splits()):
        for part in ("train", "val", "test"):
            assert _names(getattr(splits, part)) == _names(getattr(expected, part))
        assert splits.class_names == DEMO_CLASSES


def test_held_out_samples_spread_over_val_then_test(demo):
    data = DataConfig(shots=4, val_per_class=2, test_per_class=3)
    splits = make_splits(demo, 4, 2, 3, seed=0)
    held_out = _run_on(data).held_out_samples(10)
    assert _names(held_out) == _names((splits.val + splits.test)[::5])  # 50 images, every 5th
    assert len({s.label for s in held_out}) > 1  # class-major lists: a stride spans classes


def test_held_out_samples_fall_back_to_the_bundled_set(demo, tmp_path):
    gone = _run_on(DataConfig(source=str(tmp_path / "moved-away")))
    assert _names(gone.held_out_samples(4)) == _names(demo.samples[::2500])


# --------------------------------------------------------------------------- folders


def test_folder_dataset(tmp_path):
    root = tmp_path / "pets"
    _image(root / "dog" / "b.png")
    _image(root / "dog" / "a.jpg")
    _image(root / "cat" / "x.PNG")
    _image(root / "cat" / "nested" / "y.bmp")
    (root / "cat" / "notes.txt").write_text("not an image")
    _image(root / "cat" / ".hidden.png")
    _image(root / ".cache" / "z.png")
    data = load_labeled(str(root))
    assert data.class_names == ["cat", "dog"]
    assert [(s.name, s.label) for s in data.samples] == [
        (str(root / "cat" / "nested" / "y.bmp"), 0),
        (str(root / "cat" / "x.PNG"), 0),
        (str(root / "dog" / "a.jpg"), 1),
        (str(root / "dog" / "b.png"), 1),
    ]
    assert all(s.image == s.name and s.caption is None for s in data.samples)


def test_folder_errors(tmp_path):
    assert "no class subfolders" in _input_error(load_labeled, str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("hi")
    assert _input_error(load_labeled, str(tmp_path)).startswith(f"{tmp_path / 'cat'}: no image")
    assert "no such file or folder" in _input_error(load_labeled, str(tmp_path / "missing"))
    (tmp_path / "data.txt").write_text("x")
    assert ".csv/.jsonl" in _input_error(load_labeled, str(tmp_path / "data.txt"))


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def manifest_images(tmp_path):
    """Two images beside the manifest's folder and one given by absolute path."""
    _image(tmp_path / "m" / "img" / "a.png")
    _image(tmp_path / "m" / "img" / "b.png")
    return tmp_path / "m", _image(tmp_path / "elsewhere" / "c.png")


def test_csv_manifest(manifest_images, tmp_path, monkeypatch):
    folder, absolute = manifest_images
    (folder / "list.csv").write_text(
        f'path, label, caption\nimg/a.png, zebra, "striped, black and white"\n'
        f"img/b.png,ant,\n{absolute},ant,small\n"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths must not depend on the cwd
    data = load_labeled(str(folder / "list.csv"))
    assert data.class_names == ["ant", "zebra"]
    assert [(s.name, s.label, s.caption) for s in data.samples] == [
        (str(folder / "img" / "a.png"), 1, "striped, black and white"),
        (str(folder / "img" / "b.png"), 0, None),
        (str(absolute), 0, "small"),
    ]
    assert read_image(data.samples[0]).size == (6, 4)


def test_jsonl_manifest(manifest_images):
    folder, absolute = manifest_images
    rows = [
        {"path": "img/a.png", "label": "zebra", "caption": "striped"},
        {"path": "img/b.png", "label": "ant"},
        {"path": str(absolute), "label": "ant", "caption": None, "extra": 1},
    ]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n"
    (folder / "list.jsonl").write_text(text)
    data = load_labeled(str(folder / "list.jsonl"))
    assert data.class_names == ["ant", "zebra"]
    assert [(s.name, s.label, s.caption) for s in data.samples] == [
        (str(folder / "img" / "a.png"), 1, "striped"),
        (str(folder / "img" / "b.png"), 0, None),
        (str(absolute), 0, None),
    ]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("m.csv", "path,caption\nimg/a.png,x\n", "missing required column 'label'"),
        ("m.csv", "file,label\nimg/a.png,x\n", "missing required column 'path'"),
        ("m.csv", "", "missing required column 'path'"),
        ("m.csv", "path,label\n", "manifest has no rows"),
        ("m.csv", "path,label\nimg/a.png,\n", "m.csv:2: 'label' must be a non-empty string"),
        ("m.csv", "path,label\nimg/nope.png,x\n", "m.csv:2: "),
        ("m.jsonl", '{"path": "img/a.png", "label": "x"}\n{"path": oops}\n', "m.jsonl:2: bad JSON"),
        ("m.jsonl", '{"path": "img/a.png"}\n', "m.jsonl:1: 'label' must be a non-empty string"),
        ("m.jsonl", '["img/a.png", "x"]\n', "m.jsonl:1: expected a JSON object"),
        ("m.jsonl", '{"path": "img/a.png", "label": 3}\n', "'label' must be a non-empty string"),
        ("m.jsonl", '{"path": "img/a.png", "label": "x", "caption": 5}\n', "'caption' must be"),
    ],
)
def test_manifest_errors(manifest_images, name, content, expected):
    folder, _ = manifest_images
    (folder / name).write_text(content)
    assert expected in _input_error(load_labeled, str(folder / name))


def test_manifest_must_be_utf8(manifest_images):
    folder, _ = manifest_images
    (folder / "latin.csv").write_bytes("path,label\nimg/a.png,caf\xe9\n".encode("latin-1"))
    assert "must be UTF-8" in _input_error(load_labeled, str(folder / "latin.csv"))


def test_manifest_missing_image_names_the_line_and_file(manifest_images):
    folder, _ = manifest_images
    (folder / "m.csv").write_text("path,label\nimg/a.png,x\nimg/gone.png,y\n")
    message = _input_error(load_labeled, str(folder / "m.csv"))
    assert message == f"{folder / 'm.csv'}:3: {folder / 'img' / 'gone.png'}: no such file"


# --------------------------------------------------------------------------- inference inputs


def test_list_inputs_folder_is_recursive_sorted_and_unfiltered(tmp_path):
    root = tmp_path / "in"
    _image(root / "b.png")
    _image(root / "a" / "z.jpg")
    (root / "notes.txt").write_text("becomes an error row later")
    _image(root / ".hidden.png")
    _image(root / ".git" / "x.png")
    os.symlink(root, root / "a" / "loop")  # must not recurse forever
    names = _names(list_inputs(str(root)))
    assert names == [str(root / "a" / "z.jpg"), str(root / "b.png"), str(root / "notes.txt")]
    assert all(s.label == -1 and s.caption is None for s in list_inputs(str(root)))


def test_list_inputs_glob_manifest_and_single_file(manifest_images, tmp_path):
    folder, absolute = manifest_images
    (folder / "img" / "c.txt").write_text("x")
    assert _names(list_inputs(str(folder / "img" / "*.png"))) == [
        str(folder / "img" / "a.png"),
        str(folder / "img" / "b.png"),
    ]
    assert _names(list_inputs(str(tmp_path / "**" / "c.*"))) == [
        str(absolute),
        str(folder / "img" / "c.txt"),
    ]

    (folder / "in.csv").write_text("path,label,caption\nimg/b.png,cat,hi\nimg/missing.png,,\n")
    inputs = list(list_inputs(str(folder / "in.csv")))
    assert _names(inputs) == [str(folder / "img" / "b.png"), str(folder / "img" / "missing.png")]
    assert all(s.label == -1 and s.caption is None for s in inputs)
    (folder / "in.jsonl").write_text('{"path": "img/a.png"}\n')
    assert _names(list_inputs(str(folder / "in.jsonl"))) == [str(folder / "img" / "a.png")]

    assert _names(list_inputs(str(absolute))) == [str(absolute)]


def test_list_inputs_finds_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec in (tmp_path / "empty", tmp_path / "missing.png", tmp_path / "*.jpg"):
        assert _input_error(list_inputs, str(spec)) == f"no input files found in {spec}"
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    assert "missing required column 'path'" in _input_error(list_inputs, str(tmp_path / "bad.csv"))


def test_read_image_names_the_sample(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("nope")
    sample = next(list_inputs(str(path)))
    assert _input_error(read_image, sample) == f"{path}: not an image (cannot identify image file)"
    array_sample = Sample("demo:7", np.zeros((2, 2), np.float64), 3)
    assert _input_error(read_image, array_sample).startswith("demo:7: expected a uint8")
