"""A vqa run on Ray: `infer --engine ray` carries each input's question through Ray Data
and writes the rows `--engine local` writes, keyed by image and question (the same image
asked twice is two rows), a bad question its own error row; `serve --engine ray` answers
`question` fields (one for all images, or one per image) with those rows, and a question
that cannot be asked with 422 and one line. Two Ray starts (20-30 s each on 2 busy
cores)."""

from __future__ import annotations

import csv
import json
import re
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")
httpx = pytest.importorskip("httpx", reason="the tests talk HTTP with httpx")


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


def test_ray_serve_answers_question_fields(cli, tracked, vqa_run, vqa_manifest, tmp_path):
    images = sorted(vqa_manifest.parent.glob("*.png"))[::10]  # 3 colours
    question = "what color is the shape?"
    local = tmp_path / "local.jsonl"
    assert cli(["infer", vqa_run, *images, "-o", local, "--question", question,
                "--backend", "torch"]).code == 0
    expected = {Path(row["path"]).name: row for row in rows_by_pair(local).values()}
    command = tracked(["serve", vqa_run, "--engine", "ray", "--port", "0", "--backend",
                       "torch", "--max-file-mb", "1"], tmp_path / "serve")
    deadline = time.monotonic() + 180
    while not (found := re.search(r"^serving .* at (http://\S+)", command.stdout, re.M)):
        if command.process.poll() is not None or time.monotonic() > deadline:
            command.kill()
            pytest.fail(f"mmdeploy serve --engine ray did not start:\n{command.stderr}")
        time.sleep(0.2)
    url = found.group(1) + "predict"
    files = [("files", (p.name, p.read_bytes())) for p in images]

    def post(*questions: bytes) -> httpx.Response:
        return httpx.post(url, timeout=60,
                          files=files + [("question", (None, q)) for q in questions])

    try:
        one = post(question.encode())
        assert one.status_code == 200, one.text
        rows = one.json()["rows"]
        assert [row["path"] for row in rows] == [p.name for p in images]
        for row in rows:
            want = expected[row["path"]]
            assert (row["question"], row["answer"], row["truncated"], row["error"]) == \
                (question, want["answer"], False, None)
            assert row["score"] == pytest.approx(want["score"], abs=1e-5)
        each = post(b"what is the shape?", question.encode(), b"is there a red shape?")
        assert each.status_code == 200, each.text
        assert [row["question"] for row in each.json()["rows"]] == \
            ["what is the shape?", question, "is there a red shape?"]
        assert each.json()["rows"][1]["answer"] == rows[1]["answer"]
        for questions, message in [
                ((b"  ",), "the question is empty"),
                ((b"is th\xe9re a shape?",), "the question is not UTF-8 text (byte 5)"),
                ((), "no question: a vqa run answers each image with a question"),
                ((b"what?", b"what?"), "2 questions for 3 images: send one question for all")]:
            refused = post(*questions)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"].startswith(message)
        assert post(question.encode()).json()["rows"] == rows
    finally:
        command.process.send_signal(signal.SIGTERM)
        assert command.wait(60) == 0, command.stderr
        assert not command.leftovers(), "Ray processes outlived `mmdeploy serve`"
