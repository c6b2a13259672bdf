"""A vqa run's two-input engine: pixel_values, input_ids and attention_mask in, the text tower
inside, dynamic batch and tokens, the tokenizer published and hashed beside it; parity over
batch sizes and question lengths, padding and truncation; verify with the saved tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdeploy.artifacts import Manifest, RunDir
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError, ConfigError, InputError
from mmdeploy.exporters.calibration import calibration_reader
from mmdeploy.exporters.gate import (
    GateBounds,
    candidate_logits,
    gate_data,
    gate_samples,
    measure,
)
from mmdeploy.exporters.lint import check_for_target, lint_onnx
from mmdeploy.exporters.parity import (
    parity_batches,
    parity_cases,
    run_parity,
)
from mmdeploy.questions import TOKENIZER_DIR, QuestionTokenizer
from mmdeploy.runs import load_model, load_run_config
from mmdeploy.runtime.aoti import AotiPredictor
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor, OnnxSession, provider_options
from mmdeploy.runtime.tensorrt import EngineSidecar, Profile, check_inputs, question_profiles
from mmdeploy.runtime.torch import TorchPredictor


@pytest.fixture(scope="module")
def reference(vqa_export_run):
    return load_model(vqa_export_run)[0]


def _record(run: Path):
    return Manifest.load(RunDir(run).manifest_path).exports["onnx"]


def _images(vqa_manifest, count):
    paths = sorted(vqa_manifest.parent.glob("*.png"))[:count]
    return [Image.open(p).convert("RGB") for p in paths]


def test_the_engine_takes_an_image_and_its_question(vqa_export_run, reference):
    record = _record(vqa_export_run)
    limit = reference.backbone.max_text_length
    assert record.inputs == [
        {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]},
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "tokens"]}]
    assert [o["name"] for o in record.outputs] == ["logits", "embeddings"]
    assert record.outputs[0]["shape"] == ["batch", len(reference.class_names)]
    assert record.opset == 18 and record.details["max_question_tokens"] == limit
    assert record.details["nodes"] > 0 and record.details["export_seconds"] > 0
    # the tokenizer is part of the export: published and hashed with the graph
    tokenizer_files = sorted(n for n in record.files if n.startswith(f"{TOKENIZER_DIR}/"))
    assert record.main_file == "model.onnx"
    assert f"{TOKENIZER_DIR}/question_limits.json" in tokenizer_files
    on_disk = sorted(f"{TOKENIZER_DIR}/{p.name}"
                     for p in (RunDir(vqa_export_run).export_dir / TOKENIZER_DIR).iterdir())
    assert tokenizer_files == on_disk
    record.verify_files(RunDir(vqa_export_run).export_dir)


def test_parity_covers_batches_question_lengths_padding_and_truncation(vqa_export_run,
                                                                       reference):
    report = _record(vqa_export_run).check
    limit = reference.backbone.max_text_length
    assert report["passed"] and report["backend"] == "onnxruntime"
    assert report["criterion"] == {"max_abs": 1e-4, "min_cosine": None,
                                   "min_top1_agreement": 1.0}
    checks = report["checks"]
    assert {c["batch"] for c in checks} == {1, 7, 32}
    for batch in (1, 7, 32):
        lengths = {c["tokens"] for c in checks if c["batch"] == batch}
        assert 1 in lengths and limit in lengths and len(lengths) == 3  # 1, own, max
    kinds = {c["inputs"] for c in checks}
    assert "random pixels, real questions" in kinds
    assert "real, each question padded vs alone" in kinds
    assert all(c["passed"] and c["metrics"]["max_abs"] <= 1e-4 for c in checks)


def test_a_padding_mistake_fails_parity(reference, vqa_export_run):
    """An engine that reads the padding as tokens answers a padded question otherwise than
    alone: the padded-vs-alone check (and only checks with padding) catch it."""
    run = load_run_config(RunDir(vqa_export_run))
    cases = parity_cases(run, reference.backbone, parity_batches(ExportConfig(batch_max=8)), 0)

    def ignores_the_mask(pixels, input_ids, attention_mask):
        with torch.inference_mode():
            logits, embeddings = reference(torch.from_numpy(pixels),
                                           torch.from_numpy(input_ids),
                                           torch.ones_like(torch.from_numpy(attention_mask)))
        return {"logits": logits.numpy(), "embeddings": embeddings.numpy()}

    report = run_parity("onnxruntime", "fp32", reference, ignores_the_mask, cases)
    assert not report.passed
    failed = {c.inputs for c in report.checks if not c.passed}
    assert "real, each question padded vs alone" in failed
    assert all(c.passed for c in report.checks if c.tokens == 1)  # no padding at 1 token


def test_the_onnx_predictor_answers_as_torch(vqa_export_run, vqa_manifest):
    images = _images(vqa_manifest, 4)
    onnx = OnnxRuntimePredictor(vqa_export_run)
    limit = onnx.question_tokenizer.max_length
    questions = ["what color is the shape?", "is there a red shape " * limit + "?",
                 "what is the shape?", "does the image contain a circle?"]
    served = onnx.predict_questions(images, questions)
    eager = TorchPredictor(vqa_export_run, device="cpu").predict_questions(images, questions)
    assert served.truncated == eager.truncated == [False, True, False, False]
    np.testing.assert_allclose(served.probs, eager.probs, atol=1e-4, rtol=0)
    assert list(served.labels) == list(eager.labels)
    # a question over the limit answers as its first `limit` tokens do, as training cut it
    encoded = onnx.question_tokenizer.encode([questions[1]])
    assert encoded.input_ids.shape == (1, limit) and encoded.truncated == [True]
    alone = onnx.run_questions(onnx.preprocessor(images[1:2]), encoded.input_ids,
                               encoded.attention_mask)["logits"]
    np.testing.assert_allclose(np.exp(alone) / np.exp(alone).sum(-1), served.probs[1:2],
                               atol=1e-5, rtol=0)


def test_verify_passes_and_a_tampered_tokenizer_is_refused(vqa_export_run, tmp_path, cli,
                                                          expect_error):
    assert cli(["verify", vqa_export_run]).code == 0
    run = Path(shutil.copytree(vqa_export_run, tmp_path / "run"))
    limits = RunDir(run).export_dir / TOKENIZER_DIR / "question_limits.json"
    limits.write_text(json.dumps({"max_length": 4}))  # a shorter limit: answers would change
    with pytest.raises(ArtifactError, match="question_limits.json: size"):
        OnnxRuntimePredictor(run)
    expect_error(cli(["verify", run]), "question_limits.json")


def test_the_two_input_graph_passes_the_tensorrt_lint(vqa_export_run):
    findings = lint_onnx(RunDir(vqa_export_run).export_dir / "model.onnx")
    assert findings == [] and check_for_target(findings, "tensorrt") == []


@pytest.fixture(scope="module")
def vqa_aoti_run(vqa_export_run, tmp_path_factory, cli) -> Path:
    """A copy of the exported vqa run with an AOTInductor package beside its ONNX graph,
    batch 1..8 (compiled once per module)."""
    path = Path(shutil.copytree(vqa_export_run, tmp_path_factory.mktemp("vqa-aoti") / "run"))
    result = cli(["export", "--run", path, "--format", "aoti", "--batch-range", "1,4,8"])
    assert result.code == 0, str(result)
    return path


def test_aoti_takes_dynamic_batch_and_tokens(vqa_aoti_run, vqa_manifest, reference):
    record = Manifest.load(RunDir(vqa_aoti_run).manifest_path).exports["aoti"]
    limit = reference.backbone.max_text_length
    assert record.check["passed"] and record.device == "cpu"
    assert [i["name"] for i in record.inputs] == ["pixel_values", "input_ids", "attention_mask"]
    assert record.inputs[1] == {"name": "input_ids", "dtype": "int64",
                                "shape": ["batch", "tokens"]}
    checks = record.check["checks"]
    assert {c["batch"] for c in checks} == {1, 7, 8}
    assert {1, limit} <= {c["tokens"] for c in checks}
    assert "tokenizer/question_limits.json" in record.files
    predictor = AotiPredictor(vqa_aoti_run)
    images = _images(vqa_manifest, 9)  # two chunks: 8, then 1
    questions = ["what color is the shape?", "is there a red shape?", "what?"] * 3
    served = predictor.predict_questions(images, questions)
    eager = TorchPredictor(vqa_aoti_run, device="cpu").predict_questions(images, questions)
    np.testing.assert_allclose(served.probs, eager.probs, atol=1e-4, rtol=0)


def test_the_triton_repository_takes_the_question(vqa_export_run, vqa_manifest, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="the [triton] extra is not installed")
    from mmdeploy.exporters import triton, triton_client

    run = Path(shutil.copytree(vqa_export_run, tmp_path / vqa_export_run.name))
    repository = triton.write_repository(run, tmp_path / "repo", log=lambda line: None)
    model_dir = repository / run.name
    config = triton.parse_config(model_dir / "config.pbtxt")
    schema = triton.model_config_pb2()
    assert [(i.name, schema.DataType.Name(i.data_type), list(i.dims)) for i in config.input] \
        == [("pixel_values", "TYPE_FP32", [3, 32, 32]), ("input_ids", "TYPE_INT64", [-1]),
            ("attention_mask", "TYPE_INT64", [-1])]
    metadata = json.loads((model_dir / "mmdeploy.json").read_text())
    assert metadata["task"] == "vqa" and "tokenizer/question_limits.json" in metadata["files"]
    triton.validate_repository(repository)

    images = _images(vqa_manifest, 3)
    paths = [str(p) for p in sorted(vqa_manifest.parent.glob("*.png"))[:3]]
    pixels, rows = triton_client.preprocess(model_dir, paths)
    limit = json.loads((model_dir / "tokenizer" / "question_limits.json").read_text())
    long = "is there a red shape " * limit["max_length"]
    questions = triton_client.encode_questions(model_dir, [long, "what?", "what?"])
    inputs, _ = triton_client.request(pixels, questions)
    assert [(i.name(), i.datatype()) for i in inputs] == [
        ("pixel_values", "FP32"), ("input_ids", "INT64"), ("attention_mask", "INT64")]
    logits = OnnxSession(model_dir / "1" / "model.onnx")(
        pixels, questions.input_ids, questions.attention_mask)["logits"]
    class_names = (model_dir / "labels.txt").read_text().splitlines()
    got = triton_client.rows_from_logits(paths, rows, logits, class_names,
                                         questions=([long, "what?", "what?"],
                                                    questions.truncated))
    served = OnnxRuntimePredictor(run).predict_questions(images, [long, "what?", "what?"])
    assert [r["label"] for r in got] == [class_names[i] for i in served.labels]
    assert [r["truncated"] for r in got] == [True, False, False]
    assert [r["score"] for r in got] == pytest.approx(served.probs.max(-1), abs=1e-5)


QUESTION_PROFILES = question_profiles(1, 8, 32, (32, 32), 12, 32)


def test_the_tensorrt_profile_spans_batch_and_tokens():
    assert (
        Profile("pixel_values", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)),
        Profile("input_ids", (1, 1), (8, 12), (32, 32)),
        Profile("attention_mask", (1, 1), (8, 12), (32, 32))) == QUESTION_PROFILES
    with pytest.raises(ValueError, match="1 <= opt <= max"):
        question_profiles(1, 8, 32, (32, 32), 40, 32)
    for batch, tokens in ((1, 1), (7, 12), (32, 32)):
        check_inputs(QUESTION_PROFILES, {"pixel_values": (batch, 3, 32, 32),
                                         "input_ids": (batch, tokens),
                                         "attention_mask": (batch, tokens)})


@pytest.mark.parametrize("shapes, message", [
    ({"pixel_values": (4, 3, 32, 32), "input_ids": (4, 33), "attention_mask": (4, 33)},
     "input 'input_ids' has shape [4, 33]; the engine's profile takes 'input_ids' from "
     "[1, 1] to [32, 32]"),
    ({"pixel_values": (4, 3, 32, 32), "input_ids": (5, 9), "attention_mask": (5, 9)},
     "the inputs have different batch sizes ([4, 5])"),
    ({"pixel_values": (4, 3, 32, 32), "input_ids": (4, 9), "attention_mask": (4, 8)},
     "input_ids and attention_mask have different lengths ([8, 9])"),
    ({"pixel_values": (4, 3, 32, 32)},
     "inputs 'pixel_values'; the engine takes 'pixel_values', 'input_ids', 'attention_mask'"),
])
def test_the_profile_refuses_questions_it_was_not_built_for(shapes, message):
    with pytest.raises(InputError) as info:
        check_inputs(QUESTION_PROFILES, shapes)
    assert str(info.value) == message


def test_the_engine_sidecar_keeps_the_question_profiles(tmp_path):
    sidecar = EngineSidecar("10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0", QUESTION_PROFILES[0],
                            "fp32", "ab" * 32, 0, QUESTION_PROFILES[1:])
    sidecar.save(tmp_path / "engine.json")
    loaded = EngineSidecar.load(tmp_path / "engine.json")
    assert loaded == sidecar and loaded.profiles == QUESTION_PROFILES
    data = json.loads((tmp_path / "engine.json").read_text())
    del data["question_profiles"]  # a sidecar written before vqa engines: pixels alone
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert EngineSidecar.load(tmp_path / "old.json").profiles == QUESTION_PROFILES[:1]


def test_the_onnxruntime_tensorrt_provider_gets_all_three_inputs():
    options = provider_options("TensorrtExecutionProvider", QUESTION_PROFILES)
    assert options["trt_profile_min_shapes"] == \
        "pixel_values:1x3x32x32,input_ids:1x1,attention_mask:1x1"
    assert options["trt_profile_opt_shapes"] == \
        "pixel_values:8x3x32x32,input_ids:8x12,attention_mask:8x12"
    assert options["trt_profile_max_shapes"] == \
        "pixel_values:32x3x32x32,input_ids:32x32,attention_mask:32x32"
    assert provider_options("CPUExecutionProvider", QUESTION_PROFILES) == {}


def test_the_onnx_predictor_profiles_the_question_lengths(vqa_export_run, reference):
    predictor = OnnxRuntimePredictor(vqa_export_run)
    record = _record(vqa_export_run)
    typical = record.details["typical_question_tokens"]
    assert 1 < typical <= record.details["max_question_tokens"]
    assert predictor.profiles() == question_profiles(
        1, 8, 32, (32, 32), typical, reference.backbone.max_text_length)


def test_the_int8_gate_measures_vqa_accuracy(vqa_export_run, reference):
    """The gate's data are held-out image + question pairs, their answers the labels; its
    FP32 reference is the model on each pair; the FP32 engine, fed the same tokens, meets it
    exactly."""
    run = load_run_config(RunDir(vqa_export_run))
    data = gate_data(run, reference, reference.backbone.preprocessor)
    samples, labelled = gate_samples(run)
    assert data.questions is not None and len(data) == len(samples) > labelled > 0
    assert list(data.labels[:labelled]) == [s.label for s in samples[:labelled]]
    tokens = reference.backbone.tokenize([s.question for s in samples])
    np.testing.assert_array_equal(data.questions[0], tokens["input_ids"].numpy())
    with torch.inference_mode():
        expected = reference(torch.from_numpy(data.pixels), tokens["input_ids"],
                             tokens["attention_mask"])[0].numpy()
    np.testing.assert_allclose(data.reference, expected, atol=1e-5, rtol=0)
    engine = OnnxSession(RunDir(vqa_export_run).export_dir / "model.onnx")
    report = measure(data, candidate_logits(engine, data.inputs), GateBounds())
    assert report.passed and report.agreement == 1.0 and report.accuracy_drop_points == 0.0
    assert report.images == len(samples) and report.labelled == labelled
    assert f"on {len(samples)} image + question pairs," in report.summary()


def test_int8_export_of_a_vqa_run_is_gated_and_serves(vqa_export_run, tmp_path, cli,
                                                     vqa_manifest, reference):
    """End to end, at the gate's default bounds."""
    run = Path(shutil.copytree(vqa_export_run, tmp_path / "run"))
    result = cli(["export", "--run", run, "--int8", "dynamic"])
    assert result.code == 0, result
    assert "held-out images with their questions (VQA accuracy)" in result.stdout
    record = Manifest.load(RunDir(run).manifest_path).exports["int8"]
    data = gate_data(load_run_config(RunDir(run)), reference, reference.backbone.preprocessor)
    assert record.check["kind"] == "gate" and record.check["passed"]
    assert record.check["images"] == len(data) and record.check["labelled"] > 0
    assert record.check["bounds"] == {"min_agreement": 0.99, "max_drop_points": 1.0}
    assert "tokenizer/question_limits.json" in record.files
    assert record.details["max_question_tokens"] == reference.backbone.max_text_length
    answers = OnnxRuntimePredictor(run, precision="int8").predict_questions(
        _images(vqa_manifest, 3),
        ["what color is the shape?", "is there a red shape?", "what is the shape?"])
    assert answers.probs.shape == (3, len(reference.class_names))
    assert cli(["verify", run]).code == 0


def test_calibration_reads_images_with_their_training_questions(vqa_export_run, reference):
    run = load_run_config(RunDir(vqa_export_run))
    backbone = reference.backbone
    tokenizer = QuestionTokenizer(backbone.tokenizer, backbone.max_text_length)
    reader = calibration_reader(run, backbone.preprocessor, 8, 0, tokenizer)
    batch = reader.get_next()
    assert list(batch) == ["pixel_values", "input_ids", "attention_mask"]
    assert batch["input_ids"].dtype == np.int64 and len(batch["input_ids"]) == 8
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert reader.get_next() is None
    with pytest.raises(ConfigError, match="calibrates on images with their questions"):
        calibration_reader(run, backbone.preprocessor, 8, 0)


def test_bench_times_the_engine_on_typical_questions(vqa_export_run, tmp_path):
    from mmdeploy.bench.backends import bench_run

    result = bench_run(vqa_export_run, [1, 2], ["onnxruntime"], warmup=0, iters=1,
                       log=lambda line: None, peak_size=0)
    assert [(r.backend, r.batch) for r in result.rows] == [
        ("eager", 1), ("onnxruntime", 1), ("eager", 2), ("onnxruntime", 2)]
    assert all(r.adapted.median_ms > 0 and r.backbone is None for r in result.rows)
    assert result.skipped == {}
