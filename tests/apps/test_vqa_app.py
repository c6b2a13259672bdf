"""The app of a vqa run over HTTP with `gradio_client`: `/answer(files, question)` answers
every image with the question, as `mmdeploy infer --question` does; a question that cannot
be asked is one line and the app keeps serving; one over the tokenizer's limit is answered
and flagged. The run's two-input ONNX export serves it (ONNX Runtime), through the same
`Predictor.predict_question_pixels` every backend serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from mmdeploy.questions import MAX_QUESTION_CHARS

gradio_client = pytest.importorskip("gradio_client", reason="the ui extra is not installed")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

API = "/answer"
QUESTION = "what color is the shape?"


def client(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def table_rows(result) -> list[dict]:
    table = result[3]
    return [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]


@pytest.fixture(scope="module")
def images(vqa_manifest) -> list[Path]:
    return sorted(vqa_manifest.parent.glob("*.png"))[::5]  # one of each colour and shape


@pytest.fixture(scope="module")
def infer_rows(cli, vqa_export_run, images, tmp_path_factory) -> dict[str, dict]:
    """`mmdeploy infer --question` on the same files: its row for each, by file name."""
    folder = tmp_path_factory.mktemp("vqa-images")
    for image in images:
        shutil.copy(image, folder)
    output = folder.parent / "answers.jsonl"
    result = cli(["infer", vqa_export_run, folder, "-o", output, "--question", QUESTION])
    assert result.code == 0, str(result)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return {Path(row["path"]).name: row for row in rows}


def test_health_says_the_task(vqa_server):
    health = httpx.get(vqa_server.url + "health", timeout=10).json()
    assert health["task"] == "vqa" and health["backend"].startswith("onnxruntime")


def test_the_question_asks_every_image_as_infer_does(vqa_server, images, infer_rows):
    result = client(vqa_server.url).predict([handle_file(p) for p in images], QUESTION,
                                            api_name=API)
    rows = table_rows(result)
    assert [row["file"] for row in rows] == [p.name for p in images]
    for row in rows:
        expected = infer_rows[row["file"]]
        assert (row["question"], row["answer"], row["truncated"], row["error"]) == \
            (QUESTION, expected["answer"], False, "")
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
    first = infer_rows[images[0].name]
    assert [c["label"] for c in result[0]["confidences"]] == [a for a, _ in first["topk"]]
    assert result[1].startswith(f"**onnxruntime (CPUExecutionProvider)**: {len(images)} images in")
    assert result[2][0]["caption"].startswith(f"{images[0].name}: {QUESTION} ")


@pytest.mark.parametrize("question, message", [
    ("", "the question is empty"),
    (" \n\t", "the question is empty"),
    ("x" * (MAX_QUESTION_CHARS + 1), f"the question has {MAX_QUESTION_CHARS + 1} characters"),
])
def test_a_question_that_cannot_be_asked_is_one_line(vqa_server, images, infer_rows,
                                                     question, message):
    app = client(vqa_server.url)
    with pytest.raises(AppError) as caught:
        app.predict([handle_file(images[0])], question, api_name=API)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    good = app.predict([handle_file(images[0])], QUESTION, api_name=API)
    assert good[0]["label"] == infer_rows[images[0].name]["answer"]


def test_a_question_that_is_not_utf8_is_one_line(vqa_server, images):
    """A lone surrogate (what undecodable bytes become) sent as JSON's `\\udce9` escape, over
    Gradio's plain HTTP API (`gradio_client` cannot encode it)."""
    url = vqa_server.url
    with images[0].open("rb") as handle:
        uploaded = httpx.post(url + "gradio_api/upload", timeout=30,
                              files={"files": (images[0].name, handle, "image/png")}).json()
    body = json.dumps({"data": [[{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}],
                                "is th\udce9re a shape?"]})  # ASCII, the escape kept
    call = httpx.post(url + "gradio_api/call/answer", content=body, timeout=30,
                      headers={"content-type": "application/json"})
    events = httpx.get(url + f"gradio_api/call/answer/{call.json()['event_id']}",
                       timeout=60).text.splitlines()
    assert events[0] == "event: error"
    assert json.loads(events[1].removeprefix("data: "))["error"] == \
        "the question is not UTF-8 text (character 5)"


def test_a_question_over_the_limit_is_answered_and_flagged(vqa_server, images):
    long = "is there a red shape " * 64 + "?"
    result = client(vqa_server.url).predict([handle_file(images[0])], long, api_name=API)
    (row,) = table_rows(result)
    assert row["truncated"] is True and row["answer"] and row["error"] == ""
    assert result[1].startswith("the question was cut at the tokenizer's limit")


def test_an_unreadable_image_keeps_its_question_and_the_others_are_answered(
        vqa_server, images, infer_rows, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    result = client(vqa_server.url).predict([handle_file(bad), handle_file(images[1])],
                                            QUESTION, api_name=API)
    bad_row, good_row = table_rows(result)
    assert bad_row["question"] == QUESTION and "notes.png: not an image" in bad_row["error"]
    assert good_row["answer"] == infer_rows[images[1].name]["answer"]
