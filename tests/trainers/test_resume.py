"""`train --resume` after a real kill gives exactly the run an uninterrupted train gives."""

import json
import os
import signal
import subprocess
import sys
import time

from mmdeploy.artifacts import load_safetensors

TRAIN = ["train", "--adapter", "hmmoe", "--data", "demo", "--backbone", "tiny", "--shots", "16",
         "--batch-size", "8", "--max-steps", "60", "--seed", "3", "--option", "num_layers=2",
         "--option", "rank=4"]


def mmdeploy(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mmdeploy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def checkpoint_step(run):
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = mmdeploy(*TRAIN, "--out", str(whole))
    victim = mmdeploy(*TRAIN, "--out", str(killed))
    deadline = time.monotonic() + 120
    while checkpoint_step(killed) < 20 and time.monotonic() < deadline:  # epoch 1's end
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert 20 <= checkpoint_step(killed) < 60
    assert reference.wait() == 0, reference.stdout.read()

    resumed = mmdeploy("train", "--out", str(killed), "--resume")
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output

    expected = load_safetensors(whole / "adapter_model.safetensors")
    got = load_safetensors(killed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name
    assert (whole / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()
    assert os.path.exists(killed / "checkpoint" / "state.safetensors")
