"""The served app probed as an attacker would: raw HTTP against Gradio's routes, not only
through `gradio_client` (DESIGN section 7). Each test replays one probe against a live
`mmdeploy serve` on 127.0.0.1 and checks that `/health` still answers after it. Every
request loop is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client", reason="the ui extra is not installed")
from gradio_client import Client, handle_file  # noqa: E402

from mmdeploy.apps.server import HEADER_TIMEOUT_SECONDS  # noqa: E402

HUGE_SIDE = 6324  # 16-bit greyscale: 40.0 M pixels, just under the decode limit
PEAK_RSS_BOUND = 1.5 * 2**30
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The server's Gradio cache (GRADIO_TEMP_DIR), private to it so a test can look in."""
    return tmp_path_factory.mktemp("gradio-cache")


@pytest.fixture(scope="module")
def app(launch, tiny_run, tmp_path_factory, cache):
    """The session run served with the default limits (16 images a request, 16 MiB a file,
    2 requests at a time) and a short queue."""
    served = launch(tiny_run, tmp_path_factory.mktemp("serve-security"), 16,
                    "--max-queue", str(MAX_QUEUE), env={"GRADIO_TEMP_DIR": str(cache)})
    yield served
    code, out, err = served.stop()
    assert code == 0, f"exit {code}\n{out}\n{err}"
    # Gradio logs the traceback of each server path it refused; nothing else may fail.
    refused = err.count("gradio.exceptions.InvalidPathError: ")
    assert err.count("Traceback") == refused, err


@pytest.fixture(scope="module")
def fn_index(app) -> int:
    """The classify event's index, as a browser finds it in /config."""
    config = httpx.get(app.url + "config", timeout=10).json()
    return next(dep["id"] for dep in config["dependencies"] if dep.get("api_name") == "classify")


def healthy(app) -> None:
    response = httpx.get(app.url + "health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def join(app, fn_index: int, paths: list[str], timeout: float = 60) -> dict:
    """Post `paths` as the classify input straight to Gradio's queue (what a hand-written
    client can send) and read the event stream to its last message."""
    session = uuid.uuid4().hex
    files = [{"path": path, "meta": {"_type": "gradio.FileData"}} for path in paths]
    joined = httpx.post(app.url + "gradio_api/queue/join", timeout=10, json={
        "data": [files], "fn_index": fn_index, "session_hash": session, "event_data": None,
        "trigger_id": None})
    if joined.status_code != 200:
        return {"msg": "refused", "status": joined.status_code, "text": joined.text}
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", app.url + "gradio_api/queue/data", timeout=timeout,
                      params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            assert time.monotonic() < deadline, "no answer in time"
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") in ("process_completed", "unexpected_error"):
                    return message
    pytest.fail("the event stream ended without a result")


def cached_files(cache: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in cache.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def outside_image(tmp_path_factory) -> Path:
    """An image on the server's disk that no client uploaded."""
    path = tmp_path_factory.mktemp("server-files") / "secret.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("target", ["outside image", "run weights", "missing", "directory",
                                    "/dev/zero"])
def test_server_paths_are_refused_unopened(app, fn_index, cache, outside_image, tiny_run,
                                           target):
    """A server path posted as the input is refused with the same message whatever it is
    (so the answer tells nothing about the file), within seconds (`/dev/zero` is never
    read), and nothing of it reaches the cache."""
    path = {"outside image": outside_image, "run weights": tiny_run / "adapter_model.safetensors",
            "missing": outside_image.with_name("missing.png"),
            "directory": outside_image.parent, "/dev/zero": Path("/dev/zero")}[target]
    before = cached_files(cache)
    started = time.monotonic()
    message = join(app, fn_index, [str(path)], timeout=30)
    assert time.monotonic() - started < 20
    assert message["success"] is False
    assert "was not uploaded by a user" in message["output"]["error"]
    assert not any(word in json.dumps(message) for word in ("no such file", "directory",
                                                             "not an image"))
    content = path.read_bytes() if path.is_file() else None
    assert content is None or content not in cached_files(cache).values()
    assert set(cached_files(cache)) == set(before)
    healthy(app)


def test_file_route_serves_nothing_outside_the_cache(app, tiny_run):
    weights = tiny_run / "adapter_model.safetensors"
    for path in [str(weights), "/etc/passwd", quote(str(weights), safe=""),
                 "../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd",
                 "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/tmp/../etc/passwd", "//etc/passwd",
                 "....//....//etc/passwd"]:
        response = httpx.get(f"{app.url}gradio_api/file={path}", timeout=10)
        assert response.status_code in (403, 404), (path, response.status_code)
        assert b"root:" not in response.content
        assert weights.read_bytes()[:64] not in response.content
    healthy(app)


def huge_sixteen_bit_png(path: Path) -> Path:
    """A 6324 x 6324 16-bit greyscale PNG: about 75 KB on disk, 40 M pixels decoded."""
    ramp = np.arange(HUGE_SIDE, dtype=np.uint16) * 10
    Image.fromarray(np.broadcast_to(ramp, (HUGE_SIDE, HUGE_SIDE)).copy()).save(path)
    return path


def rss(pid: int, field: str = "VmHWM") -> int:
    """The process's peak resident set size since it started (Linux's VmHWM), or with
    `field="VmRSS"` its current one, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def test_largest_requests_stay_within_the_memory_bound(app, tmp_path):
    """Two requests at once, each of 16 images at the decode limit (16-bit, 40 M pixels):
    both answer with 16 rows, and the server's peak RSS stays under the stated bound."""
    image = huge_sixteen_bit_png(tmp_path / "huge-16bit.png")
    assert Image.open(image).mode.startswith("I;16")

    def request(_: int) -> list:
        client = Client(app.url, verbose=False, analytics_enabled=False, download_files=False)
        result = client.predict([handle_file(image)] * 16, api_name="/classify")
        return result[3]["data"]

    before = rss(app.process.pid, "VmRSS")
    with ThreadPoolExecutor(2) as pool:
        tables = list(pool.map(request, range(2)))
    assert [len(table) for table in tables] == [16, 16]
    assert all(row[3] == "" for table in tables for row in table)
    peak = rss(app.process.pid)
    print(f"\nserver RSS {before / 2**30:.2f} GiB before, peak {peak / 2**30:.2f} GiB after "
          f"2 concurrent requests of 16 images of {HUGE_SIDE}^2 16-bit")
    assert peak < PEAK_RSS_BOUND
    healthy(app)


def raw_request(app, head: bytes, body: bytes = b"", wait: float = 10) -> bytes:
    """Send `head` (and `body`) on a fresh connection; what the server answers."""
    address = urlsplit(app.url)
    with socket.create_connection((address.hostname, address.port), timeout=wait) as sock:
        sock.sendall(head + body)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return answer


def upload_head(app, length: int | None, boundary: str = "b0undary") -> bytes:
    sized = f"Content-Length: {length}\r\n" if length is not None else \
        "Transfer-Encoding: chunked\r\n"
    host = urlsplit(app.url).netloc
    return (f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{sized}\r\n").encode()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                    f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n".encode()
                    + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def test_oversized_uploads_are_refused_before_anything_is_written(app, cache):
    """40 files of 15 MiB in one upload (600 MiB): 413 from the request head alone; the
    server reads no more of the body and writes nothing."""
    before = cached_files(cache)
    started = time.monotonic()
    answer = raw_request(app, upload_head(app, 40 * (15 * 2**20 + 200)), bytes(2**20))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5
    assert cached_files(cache) == before
    healthy(app)


def test_upload_without_a_length_is_refused(app, cache):
    before = cached_files(cache)
    answer = raw_request(app, upload_head(app, None), b"10\r\n" + bytes(16) + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert cached_files(cache) == before
    healthy(app)


def test_more_files_than_a_request_takes_are_refused_and_removed(app, cache):
    """17 small files in one upload (the limit is 16): 413, and none of them is left."""
    before = cached_files(cache)
    parts = [(f"part-{i}.png", hashlib.sha256(str(i).encode()).digest() * 300)
             for i in range(17)]
    response = httpx.post(app.url + "gradio_api/upload", timeout=30, content=multipart(parts),
                          headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 413, response.text
    assert "more than 16 files in one request" in response.text
    after = cached_files(cache)
    assert not any(data in after.values() for _, data in parts)
    assert set(after) == set(before)
    healthy(app)


def test_other_bodies_are_bounded(app, fn_index):
    """A JSON call to the queue larger than any real one (1 MiB) is refused unread."""
    head = (f"POST /gradio_api/queue/join HTTP/1.1\r\nHost: {urlsplit(app.url).netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 * 2**20}\r\n\r\n").encode()
    assert raw_request(app, head, b"{").startswith(b"HTTP/1.1 413")
    healthy(app)


def test_slow_request_heads_are_cut_off(app):
    """Connections that never finish their headers are closed by the server after
    HEADER_TIMEOUT_SECONDS; the app answers meanwhile."""
    address = urlsplit(app.url)
    sockets = [socket.create_connection((address.hostname, address.port), timeout=5)
               for _ in range(50)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        healthy(app)
        time.sleep(HEADER_TIMEOUT_SECONDS + 2)
        closed = 0
        for sock in sockets:
            sock.settimeout(5)
            try:
                closed += sock.recv(1024) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(sockets)
    finally:
        for sock in sockets:
            sock.close()
    healthy(app)


def test_full_queue_refuses_at_once(app, fn_index, tmp_path):
    """More heavy requests than run (2) and wait (MAX_QUEUE) at once: the rest are told the
    queue is full straight away; every accepted one completes."""
    image = huge_sixteen_bit_png(tmp_path / "heavy.png")
    uploaded = httpx.post(app.url + "gradio_api/upload", timeout=30,
                          files=[("files", ("heavy.png", image.read_bytes(), "image/png"))])
    assert uploaded.status_code == 200, uploaded.text
    path = uploaded.json()[0]
    with ThreadPoolExecutor(12) as pool:
        messages = list(pool.map(lambda _: join(app, fn_index, [path] * 2, timeout=120),
                                 range(12)))
    full = [m for m in messages if m.get("msg") == "unexpected_error" or
            (m.get("msg") == "refused")]
    done = [m for m in messages if m.get("msg") == "process_completed"]
    assert full and all(m["success"] for m in done)
    assert len(done) + len(full) == 12 and len(done) <= 2 + MAX_QUEUE
    assert all("queue is full" in json.dumps(m).lower() for m in full)
    healthy(app)


def test_concurrent_identical_requests_download_whole_outputs(server, image_dir, tmp_path):
    """32 requests for the same photo at once, 16 threads, with gradio_client's default
    (outputs downloaded), on the app with the default queue: every thumbnail downloaded is a
    whole PNG."""
    app = server
    photo = next(image_dir.rglob("*.jpg"))

    def request(number: int) -> list[Path]:
        client = Client(app.url, verbose=False, analytics_enabled=False,
                        download_files=str(tmp_path / f"client-{number % 16}"))
        gallery = client.predict([handle_file(photo)], api_name="/classify")[2]
        return [Path(item["image"]) for item in gallery]

    with ThreadPoolExecutor(16) as pool:
        downloads = [path for paths in pool.map(request, range(32)) for path in paths]
    assert len(downloads) == 32
    for path in downloads:
        with Image.open(path) as image:
            image.load()
            assert max(image.size) <= 256
    healthy(app)


def test_no_docs_no_server_paths_and_escaped_names(app, tiny_run, tmp_path):
    for route in ("docs", "redoc"):
        assert httpx.get(app.url + route, timeout=10).status_code == 404
    # What is left at /openapi.json is Gradio's description of the app's public API (what
    # /gradio_api/info gives gradio_client), not the server's own routes.
    schema = httpx.get(app.url + "openapi.json", timeout=10).json()
    assert "/health" not in schema["paths"] and "/gradio_api/upload" in schema["paths"]
    health = httpx.get(app.url + "health", timeout=10).json()
    assert health["run"] == tiny_run.name
    assert str(tiny_run) not in httpx.get(app.url + "config", timeout=10).text

    spoofed = tmp_path / "cat\u202egnp.exe"
    Image.new("RGB", (40, 40), "white").save(spoofed, format="PNG")
    client = Client(app.url, verbose=False, analytics_enabled=False, download_files=False)
    table = client.predict([handle_file(spoofed)], api_name="/classify")[3]
    assert table["data"][0][0] == "cat\\u202egnp.exe"

    unnamed = httpx.post(app.url + "gradio_api/upload", timeout=10,
                         files=[("files", ("", b"\x89PNG not really", "image/png"))])
    assert unnamed.status_code == 400, unnamed.text
    assert unnamed.text.startswith("part 1 of the request has no file name")
    healthy(app)
