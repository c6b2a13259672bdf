"""`mmdeploy serve --shared DIR`: many adapters on one trunk over real HTTP (one server for
the module, on a copy of the session's shared export of the HMMoE and GA-Net runs): each
adapter's answers are its own export's, a mixed batch gives each adapter its rows alone,
adapters added and removed under load, another backbone refused, 32 clients across 4
adapters, per-adapter Prometheus counters, a clean shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from mmdeploy.images import load_image
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor

pytest.importorskip("prometheus_client", reason="the ui extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

BATCH_WAIT_MS = 50  # long enough that requests sent together share a trunk pass


@pytest.fixture(scope="module")
def images(image_dir) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file())[:8]


@pytest.fixture(scope="module")
def shared_copy(shared_dir, tmp_path_factory) -> Path:
    """A copy of the session's shared export: adding a branch writes into it."""
    return Path(shutil.copytree(shared_dir, tmp_path_factory.mktemp("serve-shared") / "dir"))


@pytest.fixture(scope="module")
def ganet_b(ganet_run, tmp_path_factory) -> Path:
    """A copy of the GA-Net run named ganet-b: a run the server does not serve at start."""
    return Path(shutil.copytree(ganet_run, tmp_path_factory.mktemp("add") / "ganet-b"))


@pytest.fixture(scope="module")
def server(launch, shared_copy, tmp_path_factory):
    served = launch(shared_copy, tmp_path_factory.mktemp("serve-adapters"), 16,
                          "--allow-add", "--concurrency", "8",
                          "--batch-wait-ms", str(BATCH_WAIT_MS), shared=True)
    yield served
    if served.process.poll() is None:
        served.stop()


def predict(url: str, paths: list[Path], adapter: str | None = None,
            field: str | None = None) -> httpx.Response:
    """POST the files to /adapters/ADAPTER/predict, or to /predict with `field` as the
    `adapter` form field (None: none, the default adapter)."""
    files = [("files", (path.name, path.read_bytes())) for path in paths]
    route = f"adapters/{adapter}/predict" if adapter else "predict"
    data = {"adapter": field} if field else None
    return httpx.post(url + route, files=files, data=data, timeout=60)


def metrics(url: str) -> dict[tuple[str, str], float]:
    """{(sample name, adapter label or ""): value} from /metrics."""
    text = httpx.get(url + "metrics", timeout=10).text
    return {(sample.name, sample.labels.get("adapter", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_each_adapter_answers_as_its_own_export(server, images, tiny_run, ganet_run):
    listing = httpx.get(server.url + "adapters", timeout=10).json()
    names = [a["name"] for a in listing["adapters"]]
    assert names == sorted([tiny_run.name, ganet_run.name]) and listing["default"] == names[0]
    for entry in listing["adapters"]:
        assert entry["parity"]["passed"] and entry["parity"]["max_abs"] <= 1e-4
        assert entry["run"] == entry["name"]  # the folder's name, no server path
    for run in (tiny_run, ganet_run):
        answer = predict(server.url, images, run.name)
        assert answer.status_code == 200, answer.text
        rows = answer.json()["rows"]
        own = OnnxRuntimePredictor(run)
        probs, labels = own.predict([load_image(path) for path in images])
        assert [row["run"] for row in rows] == [run.name] * len(images)
        assert [row["label"] for row in rows] == [own.class_names[i] for i in labels]
        scores = np.array([row["score"] for row in rows])
        np.testing.assert_allclose(scores, probs.max(axis=1), rtol=0, atol=1e-4)
    by_field = predict(server.url, images[:1], field=ganet_run.name).json()
    assert by_field["adapter"] == ganet_run.name
    assert predict(server.url, images[:1]).json()["adapter"] == listing["default"]


def test_a_mixed_batch_gives_each_adapter_its_rows_alone(server, images, tiny_run,
                                                         ganet_run):
    names = [tiny_run.name, ganet_run.name]
    alone = {(name, path.name): predict(server.url, [path], name).json()["rows"][0]
             for name in names for path in images[:4]}
    before = metrics(server.url)[("mmdeploy_trunk_batches_total", "")]
    jobs = [(name, path) for path in images[:4] for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: predict(server.url, [job[1]], job[0]), jobs))
    passes = metrics(server.url)[("mmdeploy_trunk_batches_total", "")] - before
    assert passes < len(jobs)  # requests for both adapters shared trunk passes
    for (name, path), answer in zip(jobs, answers, strict=True):
        row, expected = answer.json()["rows"][0], alone[(name, path.name)]
        assert row["label"] == expected["label"] and row["run"] == name
        assert abs(row["score"] - expected["score"]) <= 2e-6  # 6 decimals as written


def _load(url: str, paths: list[Path], adapter: str, stop: threading.Event,
          statuses: list[int]) -> None:
    while not stop.wait(0.02):  # a steady client, leaving the export some of the CPU
        statuses.append(predict(url, paths, adapter).status_code)


def test_adapters_are_added_and_removed_under_load(server, images, tiny_run, ganet_b):
    added = ganet_b
    stop, statuses = threading.Event(), []
    load = threading.Thread(target=_load, args=(server.url, images[:2], tiny_run.name, stop,
                                                statuses))
    load.start()
    try:
        started = time.perf_counter()
        answer = httpx.post(server.url + "adapters", json={"run": str(added)}, timeout=120)
        assert answer.status_code == 201, answer.text
        first = predict(server.url, images[:1], added.name)
        hot_add_seconds = time.perf_counter() - started
        assert first.status_code == 200 and first.json()["adapter"] == "ganet-b"
        entry = answer.json()
        assert entry["name"] == "ganet-b" and entry["parity"]["passed"]
        assert str(added.parent) not in answer.text
        again = httpx.post(server.url + "adapters", json={"run": str(added)}, timeout=30)
        assert again.status_code == 409 and "served already" in again.json()["error"]
        removed = httpx.delete(server.url + "adapters/ganet-b", timeout=10)
        assert removed.status_code == 200 and "ganet-b" not in removed.json()["adapters"]
        gone = predict(server.url, images[:1], "ganet-b")
        assert gone.status_code == 404 and "no adapter 'ganet-b'" in gone.json()["error"]
        assert httpx.delete(server.url + "adapters/ganet-b", timeout=10).status_code == 404
    finally:
        stop.set()
        load.join()
    assert statuses and set(statuses) == {200}, statuses
    print(f"hot add (export, verify, load, first answer): {hot_add_seconds:.1f} s")


def test_another_backbone_is_refused_in_one_line(server, ganet_run, tmp_path):
    other = Path(shutil.copytree(ganet_run, tmp_path / "other-backbone"))
    config = json.loads((other / "adapter_config.json").read_text())
    config["backbone_identity"] = {"config_sha256": "0" * 64, "weights_sha256": "1" * 64}
    (other / "adapter_config.json").write_text(json.dumps(config))
    answer = httpx.post(server.url + "adapters", json={"run": str(other)}, timeout=60)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert "another backbone" in error and "\n" not in error and str(tmp_path) not in error
    missing = httpx.post(server.url + "adapters", json={"run": str(tmp_path / "nope")},
                         timeout=10)
    assert missing.status_code == 400 and str(tmp_path) not in missing.text


def test_32_clients_across_4_adapters(server, images, tiny_run, ganet_run, ganet_b,
                                      tmp_path_factory):
    """Two more adapters (copies of the two runs under other names: their own branches,
    the same weights): ganet-b, removed above and added again (its branch is in DIR: not
    exported again), and hmmoe-b; then 32 clients at once, 8 per adapter."""
    copy = shutil.copytree(tiny_run, tmp_path_factory.mktemp("four") / "hmmoe-b")
    for run in (ganet_b, copy):
        answer = httpx.post(server.url + "adapters", json={"run": str(run)}, timeout=120)
        assert answer.status_code == 201, answer.text
    names = [tiny_run.name, ganet_run.name, "ganet-b", "hmmoe-b"]
    assert sorted(httpx.get(server.url + "health", timeout=10).json()["adapters"]) == \
        sorted(names)
    before = metrics(server.url)
    jobs = [(names[k % 4], images[k % len(images):k % len(images) + 2]) for k in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: predict(server.url, job[1], job[0]), jobs))
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers]
    for (name, paths), answer in zip(jobs, answers, strict=True):
        assert answer.json()["adapter"] == name and len(answer.json()["rows"]) == len(paths)
    after = metrics(server.url)
    for name in names:
        mine = [paths for adapter, paths in jobs if adapter == name]
        assert after[("mmdeploy_adapter_requests_total", name)] - \
            before.get(("mmdeploy_adapter_requests_total", name), 0) == len(mine)
        assert after[("mmdeploy_adapter_images_total", name)] - \
            before.get(("mmdeploy_adapter_images_total", name), 0) == sum(map(len, mine))
        assert after[("mmdeploy_adapter_errors_total", name)] == 0
        assert after[("mmdeploy_adapter_request_seconds_count", name)] >= len(mine)


def test_the_gradio_page_takes_the_adapter_from_its_dropdown(server, images, ganet_run):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(server.url, verbose=False, analytics_enabled=False,
                                  download_files=False)
    result = client.predict([gradio_client.handle_file(str(images[0]))], ganet_run.name,
                            api_name="/classify")
    assert result[1].startswith(f"adapter **{ganet_run.name}**")  # the status line
    with pytest.raises(gradio_client.exceptions.AppError, match="no adapter 'nope'"):
        client.predict([gradio_client.handle_file(str(images[0]))], "nope",
                       api_name="/classify")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_shutdown_leaves_no_process_behind(server):
    children = _children(server.process.pid)
    code, out, err = server.stop(signal.SIGTERM)
    assert code == 0 and out.rstrip().endswith("stopped"), f"{code}\n{out}\n{err}"
    assert "Traceback" not in err, err
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_adding_is_refused_without_allow_add(launch, shared_dir, tiny_run, tmp_path):
    """Over HTTP, on a live server started without --allow-add: a client naming a path on
    the server is refused (403) in one line that shows no server path, and nothing changes.
    """
    before = {p.name: p.stat().st_mtime_ns for p in shared_dir.iterdir()}
    served = launch(shared_dir, tmp_path, 16, shared=True)
    try:
        listed = httpx.get(served.url + "adapters", timeout=10).json()["adapters"]
        answer = httpx.post(served.url + "adapters", json={"run": str(tiny_run)}, timeout=30)
        after = httpx.get(served.url + "adapters", timeout=10).json()["adapters"]
    finally:
        code, _, err = served.stop(signal.SIGTERM)
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert "start the server with --allow-add" in error and "\n" not in error
    assert str(tiny_run) not in answer.text and str(shared_dir) not in answer.text
    assert after == listed
    assert {p.name: p.stat().st_mtime_ns for p in shared_dir.iterdir()} == before
    assert code == 0, err


@pytest.mark.parametrize("args, fragment", [
    (["RUN1", "RUN2"], "export --shared RUN1 RUN2"),
    (["RUN1", "--allow-add"], "--runs and --allow-add need --shared DIR"),
    (["--shared", "DIR", "RUN1"], "takes no RUN"),
    (["--shared", "DIR", "--engine", "ray", "--allow-add"],
     "--allow-add is for --engine gradio"),
])
def test_bad_serve_invocations_are_one_line(cli, expect_error, tiny_run, shared_dir, args,
                                            fragment):
    names = {"RUN1": tiny_run, "RUN2": tiny_run, "DIR": shared_dir}
    expect_error(cli(["serve", *(names.get(a, a) for a in args), "--port", "0"]), fragment)


def test_a_run_adapting_before_the_cut_is_refused_in_one_line(cli, launch, ganet_run,
                                                              tiny_run, tmp_path):
    """A trunk cut at block 2 (HMMoE on the last 2 of the 4 blocks, with GA-Net): adding
    the session's HMMoE run, which adapts every block from 0, is refused over HTTP (422) in
    one line that shows no server path, and the export and the adapters served stay."""
    late = tmp_path / "hmmoe-late"
    trained = cli(["train", "--adapter", "hmmoe", "--out", late, "--max-steps", 2,
                   "--shots", 4, "--option", "num_layers=2"])
    assert trained.code == 0, str(trained)
    out = tmp_path / "shared"
    exported = cli(["export", "--shared", late, ganet_run, "--out", out,
                    "--batch-range", "1,2,2"])
    assert exported.code == 0, str(exported)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    served = launch(out, tmp_path / "server", 16, "--allow-add", shared=True)
    try:
        listed = httpx.get(served.url + "adapters", timeout=10).json()["adapters"]
        answer = httpx.post(served.url + "adapters", json={"run": str(tiny_run)}, timeout=120)
        after = httpx.get(served.url + "adapters", timeout=10).json()["adapters"]
    finally:
        code, _, err = served.stop(signal.SIGTERM)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error == (f"{tiny_run.name} adapts block 0, before this trunk's cut at block 2: "
                     "export the set again with --shared to serve it")
    assert str(tiny_run.parent) not in answer.text and str(tmp_path) not in answer.text
    assert after == listed and [a["name"] for a in listed] == sorted([late.name,
                                                                      ganet_run.name])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert code == 0, err
