"""A real `mmdeploy serve` process on a free local port, shared by the app tests.

The server is the command a user runs (a subprocess, `--port 0` so the OS picks a free
port, read back from the URL it prints), serving the session's trained + exported run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_SECONDS = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path
    max_file_mb: int = 16

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str, str]:
        """Send `sig`, wait for the exit; (exit status, stdout, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code, self.stdout.read_text(), self.stderr.read_text()


def start_server(run: Path, folder: Path, max_file_mb: int = 16, *args: str,
                 env: dict[str, str] | None = None, shared: bool = False) -> Server:
    """`mmdeploy serve RUN --port 0 --max-file-mb N ARGS` (`serve --shared RUN ...` when
    `shared`: RUN is a shared export; with `env` added to the environment), returned once
    it has printed the URL it serves."""
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "mmdeploy", "serve", *["--shared"] * shared, str(run),
             "--port", "0",
             "--max-file-mb", str(max_file_mb), *args], stdout=out, stderr=err,
            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if line.startswith("serving ") and " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
                return Server(url, process, stdout, stderr, max_file_mb)
        if process.poll() is not None:
            pytest.fail(f"mmdeploy serve exited with {process.returncode}:\n"
                        f"{stdout.read_text()}\n{stderr.read_text()}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"mmdeploy serve printed no URL in {STARTUP_SECONDS} s:\n{stderr.read_text()}")


@pytest.fixture(scope="session")
def launch():
    """`launch(run, folder, max_file_mb=16, *args, env=None)`: start `mmdeploy serve` (see
    `start_server`); the caller stops it."""
    return start_server


@pytest.fixture(scope="session")
def server(tiny_run, tmp_path_factory):
    """The app serving the session run (default limits, except 1 MiB per upload, so the
    oversized-upload test needs only a 2 MB file). At the end it must stop on SIGTERM with
    exit status 0."""
    served = start_server(tiny_run, tmp_path_factory.mktemp("serve"), max_file_mb=1)
    yield served
    code, out, err = served.stop(signal.SIGTERM)
    assert code == 0 and out.rstrip().endswith("stopped"), f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err, err


@pytest.fixture(scope="session")
def vqa_server(vqa_export_run, tmp_path_factory):
    """The app serving the session's exported vqa run (ONNX Runtime), 1 MiB per
    upload; it must stop on SIGTERM with exit status 0."""
    served = start_server(vqa_export_run, tmp_path_factory.mktemp("serve-vqa"), max_file_mb=1)
    yield served
    code, out, err = served.stop(signal.SIGTERM)
    assert code == 0 and out.rstrip().endswith("stopped"), f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in err, err
