"""The wheel: built from a clean copy of the repository, installed into a fresh venv, run
from a directory outside the repository (DESIGN section 2).

The fresh venv sees this venv's dependencies through a `.pth` path line (so torch is not
installed again); such a line only adds the folder to sys.path and does not run the `.pth`
files inside it, so the editable install's import hook stays out and `mmdeploy` must come
from the wheel. The test checks that it does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout holds beside the sources; a build must not see it (a stale build/ tree
# would leak deleted files into the wheel).
TOP_LEVEL_IGNORED = {".git", ".venv", "build", "dist", "runs", "tests", ".pytest_cache",
                     ".ruff_cache"}


def _ignored(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == REPO
    return {n for n in names
            if (top and n in TOP_LEVEL_IGNORED) or n == "__pycache__" or n.endswith(".pyc")
            or n.endswith(".egg-info")}


def run(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} -> exit {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(wheel path, the new venv's python, its mmdeploy script, a clean env, a work dir)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["HF_HUB_OFFLINE"] = "1"  # MMDEPLOY_CACHE comes from conftest: the session's cache

    source = root / "src"
    shutil.copytree(REPO, source, ignore=_ignored)
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", dist, source], cwd=root, env=env)
    (wheel,) = dist.glob("mm_peft_deploy-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    new_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root, env=env).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (new_site / "_parent_venv.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel], cwd=root, env=env)
    work = root / "elsewhere"
    work.mkdir()
    return wheel, python, venv / "bin" / "mmdeploy", env, work, new_site


def test_wheel_contents(wheel_env):
    wheel = wheel_env[0]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"mmdeploy"}  # one top-level package; stage folders mapped inside
    for required in ("mmdeploy/cli.py", "mmdeploy/assets/animal_silhouettes.npz",
                     "mmdeploy/assets/animal_silhouettes.LICENSE",
                     "mmdeploy/models/hmmoe/model.py", "mmdeploy/trainers/run.py",
                     "mmdeploy/exporters/export.py", "mmdeploy/runtime/onnxruntime.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not [n for n in names if n.startswith("mmdeploy/tests") or "__pycache__" in n]
    assert "mmdeploy = mmdeploy.cli:main" in scripts


def test_installed_package_comes_from_the_wheel(wheel_env):
    _, python, _, env, work, new_site = wheel_env
    probe = (
        "import json, sys, mmdeploy, mmdeploy.models.hmmoe.model as m\n"
        "from mmdeploy.data import demo_path\n"
        "from importlib.metadata import version\n"
        "p = demo_path()\n"
        "print(json.dumps({'package': mmdeploy.__file__, 'model': m.__file__,\n"
        "  'demo': str(p), 'demo_exists': p.is_file(),\n"
        "  'license': p.with_suffix('.LICENSE').is_file(), 'version': version('mm-peft-deploy'),\n"
        "  'editable_hook': any('__editable__' in name for name in sys.modules)}))\n"
    )
    found = json.loads(run([python, "-c", probe], cwd=work, env=env).stdout)
    for key in ("package", "model", "demo"):
        assert Path(found[key]).is_relative_to(new_site), (key, found[key])
    assert found["demo_exists"] and found["license"]
    assert found["editable_hook"] is False
    from mmdeploy import __version__

    assert found["version"] == __version__


def test_installed_cli_trains_and_exports_outside_the_repo(wheel_env):
    _, _, mmdeploy, env, work, _ = wheel_env
    help_text = run([mmdeploy, "--help"], cwd=work, env=env).stdout
    assert help_text.startswith("Usage: mmdeploy ")
    for command in ("train", "export", "verify", "infer", "info", "options"):
        assert f"  {command}" in help_text

    trained = run([mmdeploy, "train", "--adapter", "hmmoe", "--out", "runs/w", "--max-steps",
                   "3", "--shots", "1"], cwd=work, env=env)
    assert "3 steps in" in trained.stdout
    run_dir = work / "runs" / "w"
    assert (run_dir / "adapter_model.safetensors").is_file()
    exported = run([mmdeploy, "export", "--adapter", "hmmoe", "--run", "runs/w", "--format",
                    "onnx", "--batch-range", "1,2,4"], cwd=work, env=env)
    assert "onnxruntime fp32: passed parity" in exported.stdout
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    onnx = manifest["exports"]["onnx"]
    assert onnx["check"]["passed"] is True
    assert (run_dir / "export" / "model.onnx").stat().st_size == onnx["files"]["model.onnx"]["size"]
