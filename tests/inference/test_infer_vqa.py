"""`mmdeploy infer` on a vqa run: each image is answered with its question (a manifest's
`question` column, or `--question` for all), rows keyed by image and question, bad
questions one error row each, and whatever cannot be asked at all one line before anything
is written. The run's two-input ONNX export answers (ONNX Runtime), through the same
`Predictor.predict_question_pixels` every backend serves."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdeploy.questions import MAX_QUESTION_CHARS
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor

COLUMNS = ["path", "question", "answer", "score", "topk", "truncated", "error"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def predictor(vqa_export_run):
    return OnnxRuntimePredictor(vqa_export_run)


@pytest.fixture(scope="module")
def images(vqa_manifest) -> list[Path]:
    return sorted(vqa_manifest.parent.glob("*.png"))


def expected_row(predictor, image: Path, name: str, question: str, top_k: int = 5) -> dict:
    answers = predictor.predict_questions([Image.open(image).convert("RGB")], [question])
    prob = answers.probs[0]
    order = prob.argsort()[::-1][:top_k]
    names = predictor.class_names
    return {"path": name, "question": question, "answer": names[int(answers.labels[0])],
            "score": round(float(prob.max()), 6),
            "topk": [[names[i], round(float(prob[i]), 6)] for i in order],
            "truncated": answers.truncated[0], "error": None}


def assert_rows_equal(got: dict, want: dict) -> None:
    """Equal, scores to 1e-5 (a row answered in a batch of others differs in the last
    digits from the same pair answered alone)."""
    assert {k: v for k, v in got.items() if k not in ("score", "topk")} == \
        {k: v for k, v in want.items() if k not in ("score", "topk")}
    assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert [label for label, _ in got["topk"]] == [label for label, _ in want["topk"]]
    np.testing.assert_allclose([p for _, p in got["topk"]], [p for _, p in want["topk"]],
                               atol=1e-5)


def test_a_question_manifest_gets_a_row_per_image_and_question(cli, vqa_export_run, vqa_manifest,
                                                                predictor, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = cli(["infer", vqa_export_run, vqa_manifest, "-o", out, "--batch-size", 7])
    assert result.code == 0, str(result)
    rows = rows_of(out)
    with open(vqa_manifest, newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(rows) == len(lines) == 120  # 30 images, 4 questions each: none is a duplicate
    assert [(r["path"], r["question"]) for r in rows] == \
        [(str(vqa_manifest.parent / line["path"]), line["question"]) for line in lines]
    assert all(list(row) == COLUMNS and row["error"] is None and not row["truncated"]
               for row in rows)
    for row, line in list(zip(rows, lines, strict=True))[::17]:
        image = vqa_manifest.parent / line["path"]
        assert_rows_equal(row, expected_row(predictor, image, str(image), line["question"]))
    assert "120 rows written (0 errors" in result.stdout


def test_question_asks_every_image_of_a_folder(cli, vqa_export_run, images, predictor, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for image in images[:5]:
        shutil.copy(image, folder)
    out = tmp_path / "answers.csv"
    result = cli(["infer", vqa_export_run, folder, "-o", out, "--question",
                  "  what is the shape? "])
    assert result.code == 0, str(result)
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(folder / image.name) for image in images[:5]]
    for row, image in zip(rows, images[:5], strict=True):
        want = expected_row(predictor, image, str(folder / image.name), "what is the shape?")
        assert row["question"] == "what is the shape?" and row["answer"] == want["answer"]
        assert row["truncated"] == "False" and row["error"] == ""
        assert float(row["score"]) == pytest.approx(want["score"], abs=1e-5)


def test_question_asks_every_line_of_a_manifest_without_the_column(cli, vqa_export_run, images,
                                                                   tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "".join(f"{image}\n" for image in images[:3]))
    out = tmp_path / "answers.jsonl"
    result = cli(["infer", vqa_export_run, manifest, "-o", out, "--question",
                  "is there a red shape?"])
    assert result.code == 0, str(result)
    rows = rows_of(out)
    assert [(r["path"], r["question"]) for r in rows] == \
        [(str(image), "is there a red shape?") for image in images[:3]]
    assert all(row["answer"] in ("yes", "no", "red", "green", "blue", "circle", "square")
               for row in rows)


def test_bad_questions_are_one_error_row_each_and_a_long_one_is_answered_cut(
        cli, vqa_export_run, images, predictor, tmp_path):
    """An empty question, one that is not UTF-8 and an absurd one are each that line's error
    row; one over the tokenizer's limit is answered from its first tokens and says so; the
    good lines around them are answered as if alone."""
    limit = predictor.question_tokenizer.max_length
    long = "is there a red shape " * limit + "?"
    a, b = images[0], images[1]
    manifest = tmp_path / "questions.csv"
    manifest.write_bytes(b"\n".join([
        b"path,question",
        f"{a},what color is the shape?".encode(),
        f"{a},".encode(),
        f"{b},\"   \"".encode(),
        f"{b},is th\xe9re a red shape?".encode("latin-1"),
        f"{a},{'x' * (MAX_QUESTION_CHARS + 1)}".encode(),
        f"{b},{long}".encode(),
        f"{tmp_path / 'missing.png'},what is the shape?".encode(),
        f"{b},what is the shape?".encode(),
    ]) + b"\n")
    out = tmp_path / "answers.jsonl"
    result = cli(["infer", vqa_export_run, manifest, "-o", out])
    assert result.code == 0, str(result)
    rows = rows_of(out)
    assert [row["error"] for row in rows] == [
        None,
        f"{a}: the question is empty",
        f"{b}: the question is empty",
        f"{b}: the question is not UTF-8 text (character 5)",
        f"{a}: the question has {MAX_QUESTION_CHARS + 1} characters; at most "
        f"{MAX_QUESTION_CHARS} are read",
        None,
        rows[6]["error"],
        None]
    assert "missing.png" in rows[6]["error"] and rows[6]["question"] == "what is the shape?"
    assert rows[3]["question"] == "is th\\xe9re a red shape?"  # shown as `ls` shows bytes
    assert rows[5]["truncated"] is True and rows[5]["question"] == long.strip()
    assert_rows_equal(rows[5], expected_row(predictor, b, str(b), long.strip()))
    assert_rows_equal(rows[0], expected_row(predictor, a, str(a), "what color is the shape?"))
    assert_rows_equal(rows[7], expected_row(predictor, b, str(b), "what is the shape?"))
    assert all(row["answer"] is None and row["topk"] == [] for row in rows if row["error"])
    assert "8 rows written (5 errors" in result.stdout


def test_a_jsonl_question_that_is_not_text_is_an_error_row(cli, vqa_export_run, images, tmp_path):
    manifest = tmp_path / "questions.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"path": str(images[0]), "question": 7},
        {"path": str(images[0]), "question": "what is the shape?"}]) + "\n")
    out = tmp_path / "answers.jsonl"
    assert cli(["infer", vqa_export_run, manifest, "-o", out]).code == 0
    first, second = rows_of(out)
    assert first["error"] == f"{images[0]}: the question must be text, not int"
    assert first["question"] == "" and second["error"] is None


@pytest.mark.parametrize("case, fragments", [
    ("folder", ["a vqa run answers an image and a question: pass --question"]),
    ("no-column", ["no 'question' column: a vqa run answers an image and a question"]),
    ("both", ["has its own 'question' column: drop --question"]),
    ("empty", ["the question is empty"]),
])
def test_what_cannot_be_asked_at_all_is_one_line(cli, expect_error, vqa_export_run, vqa_manifest,
                                                 images, tmp_path, case, fragments):
    plain = tmp_path / "plain.csv"
    plain.write_text(f"path\n{images[0]}\n")
    args = {"folder": [vqa_manifest.parent],
            "no-column": [plain],
            "both": [vqa_manifest, "--question", "what is the shape?"],
            "empty": [vqa_manifest.parent, "--question", "  "]}[case]
    out = tmp_path / "answers.jsonl"
    expect_error(cli(["infer", vqa_export_run, *args, "-o", out]), *fragments)
    assert not out.exists()


def test_a_classification_run_refuses_questions_in_one_line(cli, expect_error, tiny_run,
                                                            vqa_manifest, image_dir, tmp_path):
    out = tmp_path / "rows.jsonl"
    expect_error(cli(["infer", tiny_run, image_dir, "-o", out, "--question", "what?"]),
                 "this is a classification run: it takes images, not questions")
    expect_error(cli(["infer", tiny_run, vqa_manifest, "-o", out]),
                 "a 'question' column, but this is a classification run")
    assert not out.exists()


def test_resume_keys_rows_by_image_and_question(cli, vqa_export_run, vqa_manifest, tmp_path):
    """A run cut after 13 rows plus a torn line, resumed, is byte for byte the
    uninterrupted run (batch size 1: every pair is answered alone in both). 10 images, each
    asked its 4 questions."""
    with open(vqa_manifest, newline="") as handle:
        lines = list(csv.DictReader(handle))[:40]
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("path,question\n" + "".join(
        f"{vqa_manifest.parent / line['path']},{line['question']}\n" for line in lines))
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    args = ["--batch-size", 1, "--workers", 0]
    assert cli(["infer", vqa_export_run, manifest, "-o", whole, *args]).code == 0
    lines = whole.read_bytes().split(b"\n")
    cut.write_bytes(b"\n".join(lines[:13]) + b"\n" + lines[13][:20])
    result = cli(["infer", vqa_export_run, manifest, "-o", cut, "--resume", *args])
    assert result.code == 0, str(result)
    assert "27 rows written (0 errors, 13 already done)" in result.stdout
    assert cut.read_bytes() == whole.read_bytes()
    again = cli(["infer", vqa_export_run, manifest, "-o", cut, "--resume"])
    assert "0 rows written (0 errors, 40 already done)" in again.stdout


def test_the_same_pair_listed_twice_gets_one_row(cli, vqa_export_run, images, tmp_path):
    manifest = tmp_path / "twice.csv"
    manifest.write_text(f"path,question\n{images[0]},what?\n{images[0]},what?\n"
                        f"{images[0]},what is the shape?\n")
    out = tmp_path / "answers.jsonl"
    result = cli(["infer", vqa_export_run, manifest, "-o", out])
    assert [(r["path"], r["question"]) for r in rows_of(out)] == \
        [(str(images[0]), "what?"), (str(images[0]), "what is the shape?")]
    assert "1 duplicate skipped" in result.stdout
