"""ONNX Runtime comes from an extra, and a machine without it says which.

`onnxruntime` and `onnxruntime-gpu` write the same `onnxruntime` package: an environment
holding both keeps whichever was installed last, and uninstalling one breaks the other. So
the base install requires neither, `[cpu]` brings the first and `[gpu]` the second, and
pip's own resolution of each extra must hold exactly one of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from mmdeploy.errors import BackendUnavailableError
from mmdeploy.runtime import load_predictor, pick_backend
from mmdeploy.runtime.onnxruntime import available_providers

REPO = Path(__file__).resolve().parents[1]
HINT = "not installed; pip install 'mm-peft-deploy[cpu]', or '[gpu]' for CUDA"
# What pip says when it cannot reach the index (urllib3's errors, in its retry warnings).
NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeoutError", "ProxyError", "SSLError",
                  "Could not fetch URL")


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project's sources without the checkout's extras: setuptools writes the metadata
    (an egg-info folder) beside pyproject.toml, and the shared checkout must not change."""
    top_level = {".git", ".venv", "build", "dist", "runs", "tests", "docs", "benchmarks",
                 ".pytest_cache", ".ruff_cache"}

    def ignored(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {n for n in names if (top and n in top_level) or n == "__pycache__"
                or n.endswith(".egg-info")}

    target = tmp_path_factory.mktemp("extras") / "project"
    return Path(shutil.copytree(REPO, target, symlinks=True, ignore=ignored))


def resolve(project: Path, extra: str) -> set[str]:
    """The distributions pip would install for `project[extra]` into an empty environment
    (`--ignore-installed`: what this venv already holds does not count), without installing.

    `--no-build-isolation` builds the metadata with this venv's setuptools instead of first
    installing one into a fresh build environment. `--retries 1`: an unreachable index gives
    up soon, and pip's retry warning says why (which skips the test).
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--no-build-isolation", "--retries", "1", "--timeout", "30", "--quiet",
         "--report", "-", f".[{extra}]"],
        cwd=project, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        offline = [line for line in result.stderr.splitlines()
                   if any(error in line for error in NETWORK_ERRORS)]
        if offline:
            pytest.skip(f"the package index is unreachable: {offline[0].strip()}")
        pytest.fail(f"pip could not resolve .[{extra}] (exit {result.returncode}):\n"
                    f"{result.stderr[-4000:]}")
    report = json.loads(result.stdout)
    return {canonicalize_name(item["metadata"]["name"]) for item in report["install"]}


@pytest.mark.parametrize(("extra", "wanted", "unwanted"), [
    ("gpu", "onnxruntime-gpu", "onnxruntime"),
    ("cpu", "onnxruntime", "onnxruntime-gpu"),
])
def test_each_extra_resolves_to_one_onnxruntime(project_copy, extra, wanted, unwanted):
    names = resolve(project_copy, extra)
    onnx_names = sorted(n for n in names if n.startswith("onnx"))
    assert wanted in names, onnx_names
    assert unwanted not in names, onnx_names


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """`import onnxruntime` fails in this process as it does where it is not installed."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_the_predictor_names_the_extra(tiny_run, no_onnxruntime):
    with pytest.raises(BackendUnavailableError) as caught:
        load_predictor(tiny_run, "onnxruntime")
    assert str(caught.value) == f"backend 'onnxruntime' is unavailable: {HINT}"


def test_the_automatic_choice_passes_over_it_and_says_how_to_install(tiny_run,
                                                                     no_onnxruntime):
    backend, skipped = pick_backend(tiny_run)
    assert backend == "torch"
    assert f"onnxruntime on cpu: {HINT}" in skipped


def test_a_broken_onnxruntime_says_why(tmp_path, monkeypatch):
    """Installed but failing to load: the import's own first line, then the same advice."""
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text(
        "raise ImportError('libcudnn.so.9: cannot open shared object file\\nmore')\n")
    for name in [n for n in sys.modules if n.split(".")[0] == "onnxruntime"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(BackendUnavailableError) as caught:
        available_providers()
    assert caught.value.reason == ("installed but does not import (libcudnn.so.9: cannot open "
                                   "shared object file); pip install 'mm-peft-deploy[cpu]', "
                                   "or '[gpu]' for CUDA")


def test_verify_says_it_in_one_line(tiny_run, no_onnxruntime, cli, expect_error):
    expect_error(cli(["verify", tiny_run]), HINT)


def test_export_says_it_in_one_line_before_writing(run_copy, digest):
    """In a fresh process: the exporters import ONNX Runtime's quantization tools when
    they load, and this process has loaded them already."""
    before = digest(run_copy)
    hidden = ("import sys; sys.modules['onnxruntime'] = None; sys.argv[0] = 'mmdeploy'; "
              "from mmdeploy.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", hidden, "export", "--run", str(run_copy),
                             "--format", "onnx"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: backend 'onnxruntime' is unavailable: {HINT}"], result.stderr
    assert digest(run_copy) == before
