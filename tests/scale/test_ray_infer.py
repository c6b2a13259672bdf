"""`mmdeploy infer --engine ray` on a local 2-CPU Ray: killed mid-run with SIGKILL, then
resumed, it ends with exactly the rows `--engine local` writes (keyed by path: Ray does not
keep order), each once, bad files included.

One Ray job is killed and one resumes it: two Ray starts for the whole module (20-30 s
each on 2 busy cores). The resumed run uses `--actors 2` on 2 CPUs, the setting that hangs
silently if the actors hold every CPU (see `ray_infer.actor_resources`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from mmdeploy.inference.demo_images import write_demo_images

pytest.importorskip("ray", reason="the ray extra is not installed")

IMAGES = 200
BROKEN = ["bear/000-broken.png", "dog/050-broken.jpg", "zebra/999-broken.png"]
RUN_SECONDS = 240


@pytest.fixture(scope="module")
def inputs(image_dir, tmp_path_factory) -> list[str]:
    """Three input specs: a folder of 200 real images with 3 undecodable files among them,
    the session's photographs, and a manifest with a bad line and a file listed again."""
    root = tmp_path_factory.mktemp("ray-inputs")
    many = root / "many"
    assert len(write_demo_images(many, count=IMAGES)) == IMAGES
    for name in BROKEN:
        (many / name).parent.mkdir(exist_ok=True)
        (many / name).write_bytes(b"not an image at all")
    photos = Path(shutil.copytree(image_dir / "extra", root / "photos"))
    manifest = root / "list.jsonl"
    again = next(photos.iterdir())
    manifest.write_text(f'{json.dumps({"path": str(again)})}\n{{"path": 7}}\n'
                        f'{json.dumps({"path": "missing.png"})}\n')
    return [str(many), str(photos), str(manifest)]


@pytest.fixture(scope="module")
def local_rows(cli, tiny_run, inputs, rows_by_path, tmp_path_factory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("local") / "rows.jsonl"
    result = cli(["infer", tiny_run, *inputs, "-o", output, "--backend", "onnxruntime"])
    assert result.code == 0, str(result)
    assert "1 duplicate skipped" in result.stdout
    return rows_by_path(output)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_then_resumed_ray_run_has_the_local_rows_each_once(
        tracked, tiny_run, inputs, local_rows, rows_by_path, same_row, tmp_path):
    output = tmp_path / "rows.jsonl"
    args = ["infer", tiny_run, *inputs, "-o", output, "--engine", "ray", "--batch-size", "4",
            "--backend", "onnxruntime"]
    killed = tracked([*args, "--actors", "1"], tmp_path / "killed")  # fewer to start
    deadline = time.monotonic() + RUN_SECONDS
    while complete_lines(output) == 0:
        assert killed.process.poll() is None, killed.stderr
        if time.monotonic() > deadline:
            killed.kill()
            pytest.fail(f"no row written in {RUN_SECONDS} s:\n{killed.stderr}")
        time.sleep(0.002)
    killed.kill()
    done = complete_lines(output)
    total = len(local_rows)
    assert 0 < done < total, "the kill landed after the end: nothing was tested"

    resumed = tracked([*args, "--actors", "2", "--resume"], tmp_path / "resumed")
    assert resumed.wait(RUN_SECONDS) == 0, resumed.stderr
    assert "local Ray: 1 node, 2 CPUs" in resumed.stderr
    assert f"{total - done} rows written" in resumed.stdout, resumed.stdout
    assert f"{done} already done, 1 duplicate skipped" in resumed.stdout, resumed.stdout
    assert not resumed.leftovers(), "Ray processes outlived the command"

    counts = Counter(json.loads(line)["path"] for line in output.read_text().splitlines())
    assert set(counts) == set(local_rows) and set(counts.values()) == {1}
    rows = rows_by_path(output)
    for path, expected in local_rows.items():
        same_row(rows[path], expected)
    errors = {path for path, row in rows.items() if row["error"]}
    assert len(errors) == len(BROKEN) + 2  # the broken files, the bad and the missing line
    assert all(json.loads(line) == rows[json.loads(line)["path"]]
               for line in output.read_text().splitlines())
