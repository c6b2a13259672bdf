import os
import struct

import pytest
import torch

from mmdeploy import artifacts
from mmdeploy.artifacts import (
    ExportRecord,
    Manifest,
    RunDir,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json,
    safetensors_metadata,
    save_safetensors,
    sha256_file,
)
from mmdeploy.errors import ArtifactError


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert read_json(tmp_path / "c.json") == {"a": [1, 2], "b": 1}
    assert (tmp_path / "c.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_respects_umask(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    atomic_write_json(target, {"version": 1})

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(artifacts.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_json(target, {"version": 2})
    assert read_json(target) == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_output_discards_on_error(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope\.json: missing"):
        read_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ArtifactError, match=r"bad\.json: not valid JSON \(line 3\)"):
        read_json(bad)


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- safetensors


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"a.weight": base.t(), "a.bias": base[0], "b": torch.ones(2, dtype=torch.float16)}
    save_safetensors(path, tensors, metadata={"adapter": "hmmoe"})
    return path, tensors


def test_safetensors_round_trip_with_metadata(weights):
    path, tensors = weights
    loaded = load_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    assert safetensors_metadata(path) == {"adapter": "hmmoe"}
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing"),
        ("empty", r"empty file \(0 bytes\)"),
        ("lfs", "Git LFS pointer, not the weights; run git lfs pull"),
        ("mid_data", r"truncated safetensors file \(tensor data needs \d+ bytes after the header"),
        ("mid_header", r"truncated or corrupt .* \(header says \d+ bytes, file has \d+\)"),
        ("garbage_length", r"truncated or corrupt .* \(header says \d+ bytes, file has \d+\)"),
        ("garbage_json", r"truncated or corrupt safetensors file \(header is not a JSON object\)"),
        ("tiny", "truncated or corrupt safetensors file"),
    ],
)
def test_corrupt_safetensors_named(weights, case, message):
    path, _ = weights
    good = path.read_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    if case == "missing":
        path.unlink()
    else:
        contents = {
            "empty": b"",
            "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 123\n",
            "mid_data": good[:-10],
            "mid_header": good[: 8 + header_len // 2],
            "garbage_length": struct.pack("<Q", 2**63 + header_len) + good[8:],
            "garbage_json": good[:8] + b"\xff" * header_len + good[8 + header_len :],
            "tiny": b"\x01\x02\x03",
        }[case]
        path.write_bytes(contents)
    for reader in (load_safetensors, safetensors_metadata):
        with pytest.raises(ArtifactError, match=message) as info:
            reader(path)
        assert str(info.value).startswith(f"{path}: ")
        assert "\n" not in str(info.value)


def test_inconsistent_offsets_are_an_artifact_error(weights):
    path, _ = weights
    path.write_bytes(path.read_bytes() + b"trailing junk")
    with pytest.raises(ArtifactError, match="corrupt safetensors file"):
        load_safetensors(path)


# ---------------------------------------------------------------------------- run directory


def test_run_dir_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config_path.name == "adapter_config.json"
    assert run.weights_path.name == "adapter_model.safetensors"
    assert run.metrics_path.name == "metrics.jsonl"
    assert run.checkpoint_dir.name == "checkpoint"
    assert run.manifest_path == tmp_path / "r" / "export" / "manifest.json"


def test_prepare_new_refuses_existing_run_without_overwrite(tmp_path):
    run = RunDir(tmp_path / "runs" / "x")
    run.prepare_new(overwrite=False)
    run.prepare_new(overwrite=False)  # empty: fine
    atomic_write_json(run.config_path, {"adapter": "ganet"})
    (run.export_dir).mkdir()
    (run.export_dir / "model.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite to replace it"):
        run.prepare_new(overwrite=False)
    run.prepare_new(overwrite=True)
    assert run.root.is_dir() and list(run.root.iterdir()) == []


def test_prepare_new_overwrite_spares_foreign_directories(tmp_path):
    run = RunDir(tmp_path / "home")
    run.root.mkdir()
    (run.root / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not a run directory"):
        run.prepare_new(overwrite=True)
    assert (run.root / "thesis.tex").read_text() == "precious"


def test_require(tmp_path):
    run = RunDir(tmp_path / "x")
    with pytest.raises(ArtifactError, match="no such run directory"):
        run.require()
    run.root.mkdir()
    with pytest.raises(ArtifactError, match=r"is not a run directory \(no adapter_config.json\)"):
        run.require()
    atomic_write_json(run.config_path, {})
    run.require()


# ---------------------------------------------------------------------------- manifest


@pytest.fixture
def export(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model.onnx").write_bytes(b"graph" * 100)
    (export_dir / "model.onnx.data").write_bytes(os.urandom(4096))
    (export_dir / "model.pt2").write_bytes(b"package" * 10)
    onnx = ExportRecord(
        backend="onnxruntime", precision="fp32", batch_range={"min": 1, "opt": 8, "max": 64},
        check={"kind": "parity", "passed": True, "worst": {"max_abs": 3e-6}},
        inputs=[{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
        opset=18, versions={"torch": "2.13.0", "onnx": "1.23.2"}, details={"lint": []})
    onnx.add_file(export_dir, "model.onnx")
    onnx.add_file(export_dir, "model.onnx.data")
    aoti = ExportRecord(backend="aoti", precision="fp32", device="cpu",
                        batch_range={"min": 1, "opt": 4, "max": 8},
                        check={"kind": "parity", "passed": False})
    aoti.add_file(export_dir, "model.pt2")
    manifest = Manifest(exports={"onnx": onnx, "aoti": aoti}, deploy_form_max_abs=1e-7,
                        parity_seed=3)
    return export_dir, manifest


def test_manifest_round_trip(export):
    export_dir, manifest = export
    manifest.save(export_dir / "manifest.json")
    loaded = Manifest.load(export_dir / "manifest.json")
    assert loaded == manifest
    assert isinstance(loaded.exports["onnx"], ExportRecord)
    assert loaded.files["model.onnx"] == {
        "sha256": sha256_file(export_dir / "model.onnx"),
        "size": 500,
    }
    assert loaded.exports["onnx"].main_file == "model.onnx"
    assert loaded.exports["onnx"].batch_limits == (1, 64)  # each export its own range
    assert loaded.exports["aoti"].batch_limits == (1, 8)
    assert loaded.record("onnx") is not None and loaded.record("aoti") is None  # not passed
    loaded.verify_files(export_dir)


def test_manifest_load_errors_name_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"format_version": 2, "exports": {}, "surprise": 1})
    with pytest.raises(ArtifactError, match=r"manifest\.json: .*unknown option\(s\) surprise"):
        Manifest.load(path)
    record = {"backend": "onnxruntime", "precision": "fp32", "check": {"passed": True},
              "batch_range": {"min": 1, "opt": 1, "max": 8}}
    atomic_write_json(path, {"format_version": 2, "exports": {
        "onnx": {**record, "files": {"model.onnx": {"sha256": "ab"}}}}})
    with pytest.raises(ArtifactError, match=r"manifest\.json: files entry 'model.onnx'"):
        Manifest.load(path)
    atomic_write_json(path, {"format_version": 2, "exports": {"onnx": {**record, "files": []}}})
    with pytest.raises(ArtifactError,
                       match=r"export 'onnx': field 'files' should be a JSON object"):
        Manifest.load(path)
    atomic_write_json(path, {"format_version": 2, "exports": {
        "onnx": {**record, "batch_range": {"min": 1}}}})
    with pytest.raises(ArtifactError, match=r"batch_range needs integer min and max"):
        Manifest.load(path)
    atomic_write_json(path, {"format_version": 3, "exports": {}})
    with pytest.raises(ArtifactError, match=r"manifest format 3, this mmdeploy reads 2; "
                                            r"re-export the run"):
        Manifest.load(path)


def test_verify_files_catches_tampered_byte(export):
    export_dir, manifest = export
    data = bytearray((export_dir / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (export_dir / "model.onnx.data").write_bytes(bytes(data))
    expected = manifest.files["model.onnx.data"]["sha256"][:8]
    with pytest.raises(ArtifactError) as info:
        manifest.verify_files(export_dir)
    assert str(info.value).startswith(f"{export_dir / 'model.onnx.data'}: sha256 mismatch")
    assert f"(manifest {expected}..., file " in str(info.value)
    manifest.exports["aoti"].verify_files(export_dir)  # the untouched export still passes


def test_verify_files_catches_missing_and_resized(export):
    export_dir, manifest = export
    (export_dir / "model.onnx").write_bytes(b"graph" * 99)
    with pytest.raises(ArtifactError, match=r"export/model\.onnx: size 495, manifest says 500"):
        manifest.verify_files(export_dir)
    (export_dir / "model.pt2").unlink()
    with pytest.raises(ArtifactError, match=r"export/model\.pt2: missing"):
        manifest.exports["aoti"].verify_files(export_dir)
