"""The app over HTTP with `gradio_client`: the predictions `infer` makes, 32 requests at once,
bad uploads refused with a clear message while the app keeps serving, /health, shutdown."""

from __future__ import annotations

import json
import signal
import statistics
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mmdeploy.images import MAX_IMAGE_PIXELS

gradio_client = pytest.importorskip("gradio_client", reason="the ui extra is not installed")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

API = "/classify"


def client(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def table_rows(result) -> list[dict]:
    """The rows the app shows (its Dataframe output), as {file, label, score, error}."""
    table = result[3]
    return [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]


@pytest.fixture(scope="module")
def images(image_dir) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def infer_rows(cli, tiny_run, image_dir, tmp_path_factory) -> dict[str, dict]:
    """`mmdeploy infer` on the same files: its row for each file, by file name."""
    output = tmp_path_factory.mktemp("infer") / "rows.jsonl"
    result = cli(["infer", tiny_run, image_dir, "-o", output])
    assert result.code == 0, str(result)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return {Path(row["path"]).name: row for row in rows}


def png_bomb(path: Path, side: int) -> Path:
    """A valid grayscale PNG of side x side black pixels: a few hundred KB that would decode
    to side**2 bytes (the classic decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one row of zeros
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))
    return path


def test_health(server):
    health = httpx.get(server.url + "health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["adapter"] == "hmmoe"
    assert health["backend"].startswith("onnxruntime")
    assert Path(health["run"]).name == "hmmoe"
    assert set(health["served"]) == {"requests", "images", "failed"}


def test_same_labels_as_infer(server, images, infer_rows):
    """One request with 16 files (the limit) and one with a single file give, for every file,
    the label and score `mmdeploy infer` wrote for it."""
    app = client(server.url)
    batch = images[:16]
    result = app.predict([handle_file(p) for p in batch], api_name=API)
    rows = table_rows(result)
    assert [row["file"] for row in rows] == [p.name for p in batch]
    for row in rows:
        expected = infer_rows[row["file"]]
        assert row["label"] == expected["label"], row["file"]
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
        assert row["error"] == ""
    assert result[0]["label"] == infer_rows[batch[0].name]["label"]
    assert [c["label"] for c in result[0]["confidences"]] == \
        [label for label, _ in infer_rows[batch[0].name]["topk"]]
    assert result[1].startswith("**onnxruntime") and " ms " in result[1]

    single = app.predict([handle_file(images[-1])], api_name=API)
    assert single[0]["label"] == infer_rows[images[-1].name]["label"]


def test_32_concurrent_requests(server, images, infer_rows):
    """32 clients at once (the queue runs 2 at a time): all succeed with infer's label."""
    files = [images[i % len(images)] for i in range(32)]
    clients = [client(server.url) for _ in files]

    def request(pair: tuple[Client, Path]) -> tuple[str, float]:
        app, path = pair
        started = time.perf_counter()
        result = app.predict([handle_file(path)], api_name=API)
        return result[0]["label"], time.perf_counter() - started

    with ThreadPoolExecutor(len(files)) as pool:
        outcomes = list(pool.map(request, zip(clients, files, strict=True)))
    assert [label for label, _ in outcomes] == [infer_rows[p.name]["label"] for p in files]
    latencies = sorted(seconds * 1e3 for _, seconds in outcomes)
    deciles = statistics.quantiles(latencies, n=10)
    print(f"\n32 concurrent clients: p50 {statistics.median(latencies):.0f} ms, "
          f"p90 {deciles[8]:.0f} ms, max {latencies[-1]:.0f} ms")


@pytest.fixture(scope="module")
def bad_uploads(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each bad upload and a fragment its error message must contain."""
    folder = tmp_path_factory.mktemp("bad-uploads")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "renamed.png").write_bytes(b"%PDF-1.4\n" + bytes(200))
    (folder / "empty.jpg").write_bytes(b"")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 500  # over our limit, under PIL's own
    Image.new("L", (side, side)).save(folder / "oversized.png")
    return {
        "non-image": (folder / "notes.txt", "notes.txt: not an image"),
        "non-image with an image extension": (folder / "renamed.png",
                                              "renamed.png: not an image"),
        "empty upload": (folder / "empty.jpg", "empty.jpg: empty file"),
        "oversized image": (folder / "oversized.png",
                            f"oversized.png: {side}x{side} pixels exceeds the limit"),
        "decompression bomb": (png_bomb(folder / "bomb.png", 15_000),
                               "bomb.png: too many pixels"),
    }


CASES = ["non-image", "non-image with an image extension", "empty upload", "oversized image",
         "decompression bomb"]


@pytest.mark.parametrize("case", CASES)
def test_bad_upload_is_refused_and_the_app_keeps_serving(server, bad_uploads, images,
                                                         infer_rows, case):
    path, fragment = bad_uploads[case]
    app = client(server.url)
    with pytest.raises(AppError) as caught:
        app.predict([handle_file(path)], api_name=API)
    assert fragment in str(caught.value)
    assert "Traceback" not in str(caught.value)
    good = app.predict([handle_file(images[0])], api_name=API)
    assert good[0]["label"] == infer_rows[images[0].name]["label"]


def test_mixed_upload_keeps_the_good_files(server, bad_uploads, images, infer_rows):
    """A bad file among good ones is an error row; the others are still predicted."""
    bad, fragment = bad_uploads["empty upload"]
    result = client(server.url).predict([handle_file(images[0]), handle_file(bad)],
                                        api_name=API)
    good_row, bad_row = table_rows(result)
    assert good_row["label"] == infer_rows[images[0].name]["label"]
    assert bad_row["label"] is None and fragment in bad_row["error"]


def test_request_limits(server, images, tmp_path):
    app = client(server.url)
    with pytest.raises(AppError, match="no image uploaded"):
        app.predict([], api_name=API)
    with pytest.raises(AppError, match=r"17 images uploaded; the limit is 16"):
        app.predict([handle_file(images[i % len(images)]) for i in range(17)], api_name=API)

    # Over the upload size limit: the client refuses to send it, and the server refuses it
    # when sent anyway (HTTP 413) before anything is decoded.
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big, compress_level=0)
    assert big.stat().st_size > server.max_file_mb * 2**20
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        app.predict([handle_file(big)], api_name=API)
    with big.open("rb") as handle:
        response = httpx.post(server.url + "gradio_api/upload", timeout=30,
                              files={"files": ("big.png", handle, "image/png")})
    assert response.status_code == 413
    assert "big.png: over the limit of 1,048,576 bytes a file" in response.text

    assert app.predict([handle_file(images[0])], api_name=API)[0]["label"]
    served = httpx.get(server.url + "health", timeout=10).json()["served"]
    assert served["failed"] >= 2


def test_ctrl_c_stops_cleanly(launch, tiny_run, tmp_path):
    """SIGINT: the server drains, prints `stopped`, exits 0 and frees its port."""
    served = launch(tiny_run, tmp_path / "serve", 16, "--backend", "torch")
    assert httpx.get(served.url + "health", timeout=10).json()["backend"].startswith("torch")
    code, out, err = served.stop(signal.SIGINT)
    assert code == 0, err
    assert out.rstrip().endswith("stopped")
    assert "Traceback" not in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(served.url + "health", timeout=5)
