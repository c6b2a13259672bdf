"""`mmdeploy serve --engine ray --replicas 2` over real HTTP: the rows `infer` writes for 50
requests sent 8 at a time, clear 4xx answers to bad uploads while serving goes on, /health
and /info, and a SIGTERM that stops it with every process it started.

One server (one Ray start) for the module; the tests run in file order and the last one
stops it.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")
httpx = pytest.importorskip("httpx", reason="the tests talk HTTP with httpx")

STARTUP_SECONDS = 180
REQUESTS = 50
CLIENTS = 8


@dataclass
class Server:
    url: str
    command: object  # conftest.Tracked


@pytest.fixture(scope="module")
def server(tracked, tiny_run, tmp_path_factory):
    """The session run on 2 replicas, 1 MiB per upload (so the oversized upload is small)."""
    command = tracked(["serve", tiny_run, "--engine", "ray", "--replicas", "2", "--port", "0",
                       "--max-file-mb", "1", "--concurrency", "4", "--backend", "onnxruntime"],
                      tmp_path_factory.mktemp("ray-serve"))
    deadline = time.monotonic() + STARTUP_SECONDS
    while not (found := re.search(r"^serving .* at (http://\S+)", command.stdout, re.M)):
        if command.process.poll() is not None or time.monotonic() > deadline:
            command.kill()
            pytest.fail(f"mmdeploy serve --engine ray did not start:\n{command.stderr}")
        time.sleep(0.2)
    yield Server(found.group(1), command)
    command.kill()  # only if a test failed before the last one stopped it


@pytest.fixture(scope="module")
def infer_rows(cli, tiny_run, image_dir, rows_by_path, tmp_path_factory) -> dict[str, dict]:
    """`mmdeploy infer` on the same files: its row for each, by file name."""
    output = tmp_path_factory.mktemp("infer") / "rows.jsonl"
    result = cli(["infer", tiny_run, image_dir, "-o", output, "--backend", "onnxruntime"])
    assert result.code == 0, str(result)
    return {Path(path).name: row for path, row in rows_by_path(output).items()}


@pytest.fixture(scope="module")
def images(image_dir) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file())


def predict(server: Server, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(server.url + "predict", timeout=60,
                      files=[("files", (name, data, "application/octet-stream"))
                             for name, data in files])


def test_health_and_info(server):
    health = httpx.get(server.url + "health", timeout=30).json()
    assert health["status"] == "ok" and health["adapter"] == "hmmoe"
    assert health["backend"].startswith("onnxruntime")
    assert health["replica"] and set(health["served"]) == {"requests", "images", "failed"}
    info = httpx.get(server.url + "info", timeout=30).json()
    assert info["adapter"] == "hmmoe" and len(info["classes"]) == health["classes"]
    assert info["serving"]["replicas"] == 2 and info["serving"]["concurrency"] == 4


def test_serve_controller_gives_the_proxy_a_minute_to_start(server):
    """The local Ray's Serve controller runs with the longer proxy ready check
    (`PROXY_READY_SECONDS`), so a slow proxy start on a loaded machine is waited for."""
    controllers = [pid for pid, _ in server.command.started
                   if b"ServeController" in _read(f"/proc/{pid}/cmdline")]
    assert controllers, "no Serve controller among the processes serve started"
    environment = _read(f"/proc/{controllers[0]}/environ").split(b"\0")
    assert b"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=60" in environment


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # the process has exited
        return b""


def test_fifty_requests_at_once_get_the_rows_infer_writes(server, images, infer_rows,
                                                          same_row):
    """Every 5th request carries 3 images; each image's row is `infer`'s, in upload order."""
    requests = [[images[(i + j) % len(images)] for j in range(3 if i % 5 == 0 else 1)]
                for i in range(REQUESTS)]

    def send(paths: list[Path]) -> tuple[list[Path], httpx.Response]:
        return paths, predict(server, [(p.name, p.read_bytes()) for p in paths])

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(send, requests))
    for paths, response in answers:
        assert response.status_code == 200, response.text
        rows = response.json()["rows"]
        assert [row["path"] for row in rows] == [p.name for p in paths]
        for path, row in zip(paths, rows, strict=True):
            same_row(row, infer_rows[path.name], path.name)


def test_bad_uploads_get_a_clear_4xx_and_serving_goes_on(server, images, infer_rows,
                                                         same_row):
    response = predict(server, [("notes.txt", b"not an image at all")])
    assert response.status_code == 400
    assert response.json()["error"] == "notes.txt: not an image (cannot identify image file)"

    response = predict(server, [("notes.txt", b"not an image"), (images[0].name,
                                                                 images[0].read_bytes())])
    assert response.status_code == 200, response.text
    bad, good = response.json()["rows"]
    assert bad["error"].startswith("notes.txt: not an image") and bad["label"] is None
    same_row(good, infer_rows[images[0].name], images[0].name)

    response = httpx.post(server.url + "predict", timeout=30, content=b"raw bytes")
    assert response.status_code == 400
    assert response.json()["error"].startswith("expected a multipart/form-data body")
    response = httpx.post(server.url + "predict", timeout=30, files={"note": (None, b"no files")})
    assert response.status_code == 400 and "no image uploaded" in response.json()["error"]

    # Limits on the body as it streams in (`apps/uploads.py`): a file over 1 MiB, more files
    # than a request takes, a body without a length, a length over the request's limit.
    response = predict(server, [("big.png", bytes(2 * 2**20))])
    assert response.status_code == 413
    assert response.json()["error"] == "big.png: over the limit of 1,048,576 bytes a file"
    response = predict(server, [(f"{i}.png", b"x") for i in range(17)])
    assert response.status_code == 413
    assert response.json()["error"] == "more than 16 files in one request; the limit is 16"
    response = httpx.post(server.url + "predict", timeout=30, content=iter([b"--x\r\n"]),
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 411
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: "
                     f"multipart/form-data; boundary=x\r\nContent-Length: {300 * 2**20}\r\n"
                     "\r\n--x\r\n".encode())
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(65536)):  # to the JSON's end
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"is over the limit" in answer, answer

    for path in images[:5]:
        response = predict(server, [(path.name, path.read_bytes())])
        assert response.status_code == 200, response.text
        same_row(response.json()["rows"][0], infer_rows[path.name], path.name)


def test_a_question_to_a_classification_run_is_422(server, images):
    response = httpx.post(server.url + "predict", timeout=30,
                          files=[("files", (images[0].name, images[0].read_bytes())),
                                 ("question", (None, b"what is it?"))])
    assert response.status_code == 422
    assert response.json()["error"] == ("this is a classification run: it takes images, not "
                                        "questions (drop the `question` field)")


def test_sigterm_stops_it_and_every_process_it_started(server):
    assert server.command.process.poll() is None, server.command.stderr
    server.command.process.send_signal(signal.SIGTERM)
    assert server.command.wait(60) == 0, server.command.stderr
    assert server.command.stdout.rstrip().endswith("stopped"), server.command.stdout
    assert "Traceback" not in server.command.stderr, server.command.stderr
    assert len(server.command.started) > 5  # GCS, raylet, replicas, proxy, controller...
    assert not server.command.leftovers(), "Ray processes outlived `mmdeploy serve`"
