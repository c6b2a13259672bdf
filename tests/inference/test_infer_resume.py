"""Kill `mmdeploy infer` with SIGKILL mid-run, twice, resume, and get the file an
uninterrupted run writes, byte for byte.

`--batch-size 1` makes every batch the same in both runs, so even the scores are bitwise
equal (ONNX Runtime's last digits depend on the batch an image is in); the resume logic
itself does not depend on the batch size (a torn multi-row batch: tests/test_cli.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmdeploy.inference.demo_images import write_demo_images

IMAGES = 250
BROKEN = ["bear/000-broken.png", "dog/050-broken.jpg", "zebra/999-broken.png"]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """250 real images (held-out demo images of every class, PNG and JPEG) and 3 undecodable
    files among them."""
    root = tmp_path_factory.mktemp("many")
    assert len(write_demo_images(root, count=IMAGES)) == IMAGES
    for name in BROKEN:
        assert (root / name).parent.is_dir()
        (root / name).write_bytes(b"not an image at all")
    return root


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def start_and_kill(args: list[str], output: Path, after_rows: int) -> int:
    """Run `python -m mmdeploy ARGS`, SIGKILL it once `output` has `after_rows` complete
    rows, and return how many complete rows it had by then."""
    process = subprocess.Popen([sys.executable, "-m", "mmdeploy", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while complete_lines(output) < after_rows:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no rows written in 300 s"
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return complete_lines(output)


def test_sigkill_twice_then_resume_gives_the_uninterrupted_file(cli, tiny_run, many_images,
                                                                tmp_path):
    total = IMAGES + len(BROKEN)
    common = ["infer", str(tiny_run), str(many_images), "--batch-size", "1",
              "--backend", "onnxruntime"]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    result = cli([*common, "-o", full])
    assert result.code == 0, str(result)
    assert f"{total} rows written ({len(BROKEN)} errors, 0 already done)" in result.stdout

    first = start_and_kill([*common, "-o", str(resumed)], resumed, after_rows=1)
    second = start_and_kill([*common, "-o", str(resumed), "--resume"], resumed,
                            after_rows=first + 60)
    assert 0 < first < second < total, "a kill landed after the end: nothing was tested"

    result = cli([*common, "-o", resumed, "--resume"])
    assert result.code == 0, str(result)
    assert f"{total - second} rows written" in result.stdout
    assert f"{second} already done" in result.stdout
    assert resumed.read_bytes() == full.read_bytes()
