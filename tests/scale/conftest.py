"""Helpers for the scale-out tests: `mmdeploy` as a subprocess with a time limit, and every
process it starts tracked, so a test can prove that nothing it started outlives it.

Ray's processes (GCS, raylet, workers, agents) are the command's descendants while it runs,
but are re-parented to init once their parent exits, so they are recorded while the
command runs (a thread reads /proc every 0.1 s), not looked for afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live process under `root`."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append((int(entry), stat[2]))
    found: set[tuple[int, int]] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


class Tracked:
    """`python -m mmdeploy ARGS` with stdout and stderr in files under `folder`, and the
    processes it started."""

    def __init__(self, args: list, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "stdout.txt", folder / "stderr.txt"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "mmdeploy",
                                             *map(str, args)], stdout=out, stderr=err)
        self.started: set[tuple[int, int]] = set()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self.process.poll() is None:
            self.started |= descendants(self.process.pid)
            time.sleep(0.1)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        """The exit status; a command still running after `timeout` s is killed and fails
        the test."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mmdeploy still running after {timeout} s:\n{self.stderr}")
        self._watcher.join()
        return code

    def leftovers(self, grace: float = 15.0) -> set[int]:
        """The processes it started that are still alive `grace` s after it exited."""
        deadline = time.monotonic() + grace
        while True:
            alive = {pid for pid, start in self.started
                     if (stat := _stat(pid)) is not None and stat[2] == start and stat[0] != "Z"}
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the command and, a moment later, whatever it started that outlived it
        (after a SIGKILL, Ray's agents wait up to a minute to notice their raylet is gone)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._watcher.join()
        for pid in self.leftovers(grace=2.0):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def tracked():
    """`tracked(args, folder)`: start `mmdeploy ARGS` as a `Tracked` subprocess."""
    return Tracked


def _rows_by_path(path: Path) -> dict[str, dict]:
    """A JSONL rows file as {path: row}; a path written twice fails."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path has more than one row"
    return by_path


def _same_row(got: dict, expected: dict, name: str | None = None) -> None:
    """The same prediction (labels, and scores to 1e-5: the batch an image is predicted in
    moves the last digits) or the same error (`name` replaces the path in it)."""
    if expected["error"] is not None:
        message = expected["error"]
        if name is not None:
            message = message.replace(expected["path"], name)
        assert got["error"] == message and got["label"] is None, (got, expected)
        return
    assert got["error"] is None and got["label"] == expected["label"], (got, expected)
    assert got["score"] == pytest.approx(expected["score"], abs=1e-5), (got, expected)
    assert [label for label, _ in got["topk"]] == [label for label, _ in expected["topk"]]
    assert [p for _, p in got["topk"]] == pytest.approx([p for _, p in expected["topk"]],
                                                         abs=1e-5)


@pytest.fixture(scope="session")
def rows_by_path():
    """`rows_by_path(file)`: a JSONL rows file as {path: row}, each path once."""
    return _rows_by_path


@pytest.fixture(scope="session")
def same_row():
    """`same_row(got, expected, name=None)`: see `_same_row`."""
    return _same_row
