"""`mmdeploy serve --shared DIR --engine ray` over real HTTP, on the session's shared export
of the HMMoE and GA-Net runs: each adapter answers as its own export (named by path segment
or `adapter` field), a mixed burst shares trunk passes and gives each adapter its rows
alone, an unknown adapter is 404, adding or removing is refused in one line, and SIGTERM
stops it with every process it started.

One server (one Ray start) for the module; the tests run in file order and the last one
stops it.
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mmdeploy.images import load_image
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor

pytest.importorskip("ray", reason="the ray extra is not installed")
httpx = pytest.importorskip("httpx", reason="the tests talk HTTP with httpx")
pytest.importorskip("prometheus_client", reason="the ui extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

STARTUP_SECONDS = 180


@pytest.fixture(scope="module")
def server(tracked, shared_dir, tmp_path_factory):
    """One replica taking 8 requests at once, waiting 50 ms for requests to share a trunk
    pass."""
    command = tracked(["serve", "--shared", shared_dir, "--engine", "ray", "--port", "0",
                       "--concurrency", "8", "--batch-wait-ms", "50"],
                      tmp_path_factory.mktemp("ray-shared"))
    deadline = time.monotonic() + STARTUP_SECONDS
    while not (found := re.search(r"^serving .* at (http://\S+)", command.stdout, re.M)):
        if command.process.poll() is not None or time.monotonic() > deadline:
            command.kill()
            pytest.fail(f"serve --shared --engine ray did not start:\n{command.stderr}")
        time.sleep(0.2)
    command.url = found.group(1)
    yield command
    command.kill()  # only if a test failed before the last one stopped it


@pytest.fixture(scope="module")
def images(image_dir) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file())[:4]


def predict(url: str, paths: list[Path], adapter: str | None = None,
            field: str | None = None) -> httpx.Response:
    files = [("files", (path.name, path.read_bytes())) for path in paths]
    route = f"adapters/{adapter}/predict" if adapter else "predict"
    return httpx.post(url + route, files=files, data={"adapter": field} if field else None,
                      timeout=60)


def trunk_batches(url: str) -> float:
    text = httpx.get(url + "metrics", timeout=10).text
    return next(sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "mmdeploy_trunk_batches_total")


def test_each_adapter_answers_as_its_own_export(server, images, tiny_run, ganet_run):
    listing = httpx.get(server.url + "adapters", timeout=30).json()
    names = [entry["name"] for entry in listing["adapters"]]
    assert names == sorted([tiny_run.name, ganet_run.name]) and listing["default"] == names[0]
    assert all(entry["parity"]["passed"] for entry in listing["adapters"])
    for run in (tiny_run, ganet_run):
        for answer in (predict(server.url, images, run.name),
                       predict(server.url, images, field=run.name)):
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["adapter"] == run.name and body["backend"].endswith("(shared trunk)")
            own = OnnxRuntimePredictor(run)
            probs, labels = own.predict([load_image(path) for path in images])
            rows = body["rows"]
            assert [row["run"] for row in rows] == [run.name] * len(images)
            assert [row["label"] for row in rows] == [own.class_names[i] for i in labels]
            np.testing.assert_allclose([row["score"] for row in rows], probs.max(axis=1),
                                       rtol=0, atol=1e-4)
    assert predict(server.url, images[:1]).json()["adapter"] == listing["default"]


def test_a_mixed_burst_shares_trunk_passes(server, images, tiny_run, ganet_run):
    names = [tiny_run.name, ganet_run.name]
    alone = {(name, path.name): predict(server.url, [path], name).json()["rows"][0]
             for name in names for path in images}
    before = trunk_batches(server.url)
    jobs = [(name, path) for path in images for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: predict(server.url, [job[1]], job[0]), jobs))
    assert trunk_batches(server.url) - before < len(jobs)  # one replica: all its passes
    for (name, path), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        row, expected = answer.json()["rows"][0], alone[(name, path.name)]
        assert row["label"] == expected["label"] and row["run"] == name
        assert abs(row["score"] - expected["score"]) <= 2e-6  # 6 decimals as written


def test_unknown_adapters_and_changes_are_refused_in_one_line(server, images, tiny_run):
    answer = predict(server.url, images[:1], "nope")
    assert answer.status_code == 404 and "no adapter 'nope'" in answer.json()["error"]
    for change in (httpx.post(server.url + "adapters", json={"run": str(tiny_run)}, timeout=30),
                   httpx.delete(server.url + f"adapters/{tiny_run.name}", timeout=30)):
        assert change.status_code == 405
        error = change.json()["error"]
        assert "fixed at start on --engine ray" in error and "\n" not in error
    assert tiny_run.name in httpx.get(server.url + "health", timeout=30).json()["adapters"]


def test_sigterm_stops_it_and_every_process_it_started(server):
    assert server.process.poll() is None, server.stderr
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.stderr
    assert server.stdout.rstrip().endswith("stopped"), server.stdout
    assert "Traceback" not in server.stderr, server.stderr
    assert not server.leftovers(), "Ray processes outlived `mmdeploy serve`"
