"""VQA data: the manifest and easy-VQA loaders, splits by image, shots per answer, the task."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from mmdeploy.config import DataConfig
from mmdeploy.data import EASY_VQA, data_task, load_labeled, make_splits
from mmdeploy.errors import InputError
from mmdeploy.runs import RunConfig


def test_a_question_manifest_is_a_vqa_set(vqa_manifest):
    data = load_labeled(str(vqa_manifest))
    assert data.task == "vqa" and data_task(str(vqa_manifest)) == "vqa"
    assert data.class_names == sorted(["red", "green", "blue", "circle", "square", "yes", "no"])
    assert len(data.samples) == 30 * 4
    first = data.samples[0]
    assert first.question == "what color is the shape?"
    assert data.class_names[first.label] == "red"
    assert data_task("demo") == "classification"


def test_splits_hold_each_image_in_one_split_and_count_questions_per_answer(vqa_manifest):
    data = load_labeled(str(vqa_manifest))
    splits = make_splits(data, shots=2, val_per_class=1, test_per_class=1, seed=0)
    assert splits.task == "vqa"
    images = [{s.name for s in split} for split in (splits.train, splits.val, splits.test)]
    assert not (images[0] & images[1]) and not (images[0] & images[2]) \
        and not (images[1] & images[2])
    for split, per_answer in ((splits.train, 2), (splits.val, 1), (splits.test, 1)):
        assert Counter(s.label for s in split) == dict.fromkeys(range(7), per_answer)
    # seeded: the same draw again; the 1-shot set is a subset of the 2-shot set
    again = make_splits(data, shots=2, val_per_class=1, test_per_class=1, seed=0)
    assert again.train == splits.train
    one = make_splits(data, shots=1, val_per_class=1, test_per_class=1, seed=0)
    assert set(one.train) <= set(splits.train)
    other = make_splits(data, shots=2, val_per_class=1, test_per_class=1, seed=1)
    assert other.train != splits.train
    full = make_splits(data, shots=0, val_per_class=1, test_per_class=1, seed=0)
    per_image = Counter(s.name for s in full.train)  # every question of the other images
    assert set(per_image.values()) == {4} and not set(per_image) & (images[1] | images[2])
    assert len(full.train) + 4 * len(images[1] | images[2]) <= len(data.samples)


def test_too_few_questions_for_an_answer_is_one_clear_error(vqa_manifest):
    data = load_labeled(str(vqa_manifest))
    with pytest.raises(InputError, match="too few training questions per answer: 'blue' has"):
        make_splits(data, shots=20, val_per_class=1, test_per_class=1, seed=0)


def test_a_vqa_manifest_without_answers_is_refused(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,question\nx.png,what?\n")
    assert data_task(str(manifest)) == "vqa"
    with pytest.raises(InputError, match="missing required column 'answer'"):
        load_labeled(str(manifest))


def test_the_task_is_recorded_and_old_configs_are_classification(vqa_manifest):
    from mmdeploy.config import BackboneConfig, TrainConfig

    run = RunConfig(adapter="hmmoe", adapter_config={}, backbone=BackboneConfig(),
                    backbone_identity={}, data=DataConfig(source=str(vqa_manifest)),
                    train=TrainConfig(), class_names=["yes", "no"], task="vqa")
    assert RunConfig.from_json(run.to_json()).task == "vqa"
    old = json.loads(run.to_json())
    del old["task"]  # written before there were tasks
    assert RunConfig.from_dict(old).task == "classification"


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="needs easy-vqa")
def test_easy_vqa_loads_with_its_own_test_split():
    data = load_labeled(EASY_VQA)
    assert data.task == "vqa" and len(data.class_names) == 13
    assert len(data.samples) == 38_575 and len(data.test) == 9_673
    assert len({s.question for s in data.samples}) == 107
    splits = make_splits(data, shots=16, val_per_class=20, test_per_class=50, seed=0)
    assert len(splits.train) == 16 * 13 and len(splits.val) == 20 * 13
    assert splits.test == data.test  # the package's test split, whole
    assert not {s.name for s in splits.val} & {s.name for s in splits.train}
