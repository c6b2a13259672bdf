"""A vqa run on Ray: `infer --engine ray` carries each input's question through Ray Data
and writes the rows `--engine local` writes, keyed by image and question (the same image
asked twice is two rows), a bad question its own error row. One Ray start (20-30 s on 2
busy cores)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")


def rows_by_pair(path: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]
    by_pair = {(row["path"], row["question"]): row for row in rows}
    assert len(by_pair) == len(rows), "a pair has more than one row"
    return by_pair


@pytest.fixture(scope="module")
def questions(vqa_manifest, tmp_path_factory) -> Path:
    """The session's vqa pairs (30 images, 4 questions each) plus an empty question, one
    that is not UTF-8 and one over the tokenizer's limit."""
    with open(vqa_manifest, newline="") as handle:
        pairs = [(vqa_manifest.parent / line["path"], line["question"])
                 for line in csv.DictReader(handle)]
    image = pairs[0][0]
    manifest = tmp_path_factory.mktemp("ray-vqa") / "questions.csv"
    manifest.write_bytes(b"path,question\n"
                         + "".join(f"{path},{question}\n" for path, question in pairs).encode()
                         + f"{image},\n".encode()
                         + f"{image},is th\xe9re a shape?\n".encode("latin-1")
                         + f"{image},{'is there a red shape ' * 64}?\n".encode())
    return manifest


def test_ray_carries_questions_and_writes_the_local_rows(cli, tracked, vqa_run, questions,
                                                         tmp_path):
    local, ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    args = ["--batch-size", "8", "--backend", "torch"]
    result = cli(["infer", vqa_run, questions, "-o", local, *args])
    assert result.code == 0, str(result)
    command = tracked(["infer", vqa_run, questions, "-o", ray, "--engine", "ray", *args],
                      tmp_path / "ray")
    assert command.wait(240) == 0, command.stderr
    assert not command.leftovers(), "Ray processes outlived the command"
    expected, got = rows_by_pair(local), rows_by_pair(ray)
    assert set(got) == set(expected) and len(got) == 120 + 3
    for pair, want in expected.items():
        row = got[pair]
        assert list(row) == list(want)
        assert {k: v for k, v in row.items() if k not in ("score", "topk")} == \
            {k: v for k, v in want.items() if k not in ("score", "topk")}, pair
        if want["error"] is None:
            assert row["score"] == pytest.approx(want["score"], abs=1e-5)
    errors = sorted(row["error"].split(": ", 1)[1] for row in got.values() if row["error"])
    assert errors == ["the question is empty",
                      "the question is not UTF-8 text (character 5)"]
    assert sum(row["truncated"] for row in got.values()) == 1
    assert "123 rows written (2 errors, 0 already done)" in command.stdout
