"""The Ray commands' checks that need no Ray running: the one-line "install the extra" error,
options refused before anything starts, how the actor pool is sized, the Parquet writer."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mmdeploy.errors import ConfigError
from mmdeploy.inference.ray_cluster import PredictorSpec, RaySession
from mmdeploy.inference.ray_engine import ParquetRows, actor_resources

INSTALL = "pip install 'mm-peft-deploy[ray]'"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the ray extra is not installed")


def test_without_ray_both_commands_name_the_extra(cli, expect_error, tiny_run, image_dir,
                                                  tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    expect_error(cli(["infer", tiny_run, image_dir, "-o", tmp_path / "rows.jsonl",
                      "--engine", "ray"]), "infer --engine ray needs ray", INSTALL)
    expect_error(cli(["serve", tiny_run, "--engine", "ray"]), "serve --engine ray needs ray",
                 INSTALL)


@needs_ray
def test_serve_names_a_missing_part_of_the_extra(cli, expect_error, tiny_run, monkeypatch):
    pytest.importorskip("ray.serve")  # imported with its real dependencies first
    monkeypatch.setitem(sys.modules, "python_multipart", None)
    expect_error(cli(["serve", tiny_run, "--engine", "ray"]),
                 "serve --engine ray needs python_multipart", INSTALL)


def test_ray_options_need_the_ray_engine(cli, expect_error, tiny_run, image_dir, tmp_path):
    out = tmp_path / "rows.jsonl"
    expect_error(cli(["infer", tiny_run, image_dir, "-o", out, "--actors", "2"]),
                 "--actors and --ray-address need --engine ray")
    expect_error(cli(["serve", tiny_run, "--replicas", "2"]),
                 "--replicas and --ray-address need --engine ray")


@needs_ray
def test_refused_before_ray_starts(cli, expect_error, tiny_run, image_dir, tmp_path):
    parquet = tmp_path / "rows.parquet"
    result = cli(["infer", tiny_run, image_dir, "-o", parquet, "--engine", "ray", "--resume"])
    expect_error(result, "--resume needs a .jsonl or .csv output")
    assert "Ray" not in result.stderr  # no Ray was started
    expect_error(cli(["infer", tiny_run, image_dir, "-o", tmp_path / "rows.txt",
                      "--engine", "ray"]), "output must end in .jsonl, .csv, .parquet")
    expect_error(cli(["infer", tiny_run, image_dir, "-o", parquet, "--engine", "ray",
                      "--workers", "2"]), "--workers is for --engine local")
    expect_error(cli(["infer", tiny_run, image_dir, "-o", parquet, "--engine", "ray",
                      "--ray-address", "127.0.0.1:1"]),
                 "cannot join the Ray cluster at 127.0.0.1:1")  # at once, not after retries


def spec(device: str) -> PredictorSpec:
    return PredictorSpec("run", "onnxruntime", "fp32", "onnxruntime", device, None)


@pytest.mark.parametrize(("cpus", "nodes", "actors", "expected"), [
    (2, 1, None, (1, 0.5, 0.0, 2)),  # one actor per node by default, on every core
    (2, 1, 2, (2, 0.5, 0.0, 1)),  # 2 actors on 2 CPUs: 1 CPU left to decode (not 0: a hang)
    (2, 1, 8, (8, 0.125, 0.0, 1)),
    (64, 4, None, (4, 0.5, 0.0, 16)),
    (64, 4, 8, (8, 0.5, 0.0, 8)),  # 2 actors a node share its 16 cores
])
def test_actors_leave_half_the_cpus_to_the_decode_tasks(cpus, nodes, actors, expected):
    session = RaySession("local", True, cpus, 0, nodes)
    size, per_actor, gpus, threads = actor_resources(spec("cpu"), session, actors)
    assert (size, per_actor, gpus, threads) == expected
    assert size * per_actor <= cpus / 2


def test_gpu_actors_take_one_gpu_each_or_are_refused():
    assert actor_resources(spec("cuda"), RaySession("a:1", False, 32, 4, 2), None) == (
        4, 0.5, 1.0, None)
    with pytest.raises(ConfigError, match="one per actor, but the Ray cluster has 1 GPUs for 2"):
        actor_resources(spec("cuda"), RaySession("a:1", False, 32, 1, 1), 2)
    with pytest.raises(ConfigError, match="has 0 GPUs for 1 actor"):
        actor_resources(spec("cuda"), RaySession("local", True, 2, 0, 1), None)


def test_parquet_rows_are_the_jsonl_rows_and_appear_only_when_closed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the ray extra")
    rows = [{"path": "a.png", "label": "cat", "score": 0.75,
             "topk": [["cat", 0.75], ["dog", 0.25]], "error": None},
            {"path": "b.png", "label": None, "score": None, "topk": [],
             "error": "b.png: not an image"}]
    path = tmp_path / "rows.parquet"
    with ParquetRows(path) as writer:
        writer.write(rows[:1])
        writer.write(rows[1:])
        assert not path.exists() and path.with_name("rows.parquet.partial").exists()
    assert not path.with_name("rows.parquet.partial").exists()
    read = pq.read_table(path).to_pylist()
    for row in read:
        row["topk"] = [[item["label"], item["prob"]] for item in row["topk"]]
    assert read == rows
