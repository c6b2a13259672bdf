import json

import numpy as np
import pytest

from mmdeploy.config import ExportConfig
from mmdeploy.errors import ConfigError, ParityError
from mmdeploy.exporters.parity import (
    Criterion,
    ParityReport,
    compare,
    criterion_for,
    evaluate,
    parity_batches,
)

BACKENDS = [
    ("onnxruntime", "fp32"),
    ("aoti", "fp32"),
    ("tensorrt", "fp32"),
    ("onnxruntime", "fp16"),
    ("aoti", "fp16"),
    ("tensorrt", "fp16"),
]


def _outputs(batch=8, classes=10, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, classes)).astype(np.float32)
    logits[np.arange(batch), np.arange(batch) % classes] += 5.0  # clear winners
    return {"logits": logits, "embeds": rng.normal(size=(batch, dim)).astype(np.float32)}


def _cases(reference, candidate):
    return [("random", len(reference["logits"]), reference, candidate)]


def test_criteria_table():
    assert criterion_for("onnxruntime", "fp32") == Criterion(1e-4, None, 1.0)
    assert criterion_for("aoti", "fp32") == Criterion(1e-4, None, 1.0)
    assert criterion_for("tensorrt", "fp32") == Criterion(1e-3, None, 1.0)
    for backend in ("onnxruntime", "aoti", "tensorrt"):
        assert criterion_for(backend, "fp16") == Criterion(None, 0.999, 0.995)
    with pytest.raises(ConfigError, match="backend 'openvino'"):
        criterion_for("openvino", "fp32")
    with pytest.raises(ConfigError, match="precision 'int8'"):
        criterion_for("onnxruntime", "int8")


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_identical_outputs_pass(backend, precision):
    reference = _outputs()
    candidate = {k: v.copy() for k, v in reference.items()}
    report = evaluate(backend, precision, _cases(reference, candidate))
    assert report.passed
    assert report.worst == {"max_abs": 0.0, "min_cosine": pytest.approx(1.0), "top1_agreement": 1.0}
    report.raise_if_failed()


def test_perturbation_fails_ort_fp32_but_passes_trt_fp32():
    reference = _outputs()
    candidate = {k: v + np.float32(2e-4) for k, v in reference.items()}
    ort = evaluate("onnxruntime", "fp32", _cases(reference, candidate))
    trt = evaluate("tensorrt", "fp32", _cases(reference, candidate))
    assert not ort.passed and trt.passed
    assert ort.worst["max_abs"] == pytest.approx(2e-4, rel=1e-2)


def test_flipped_argmax_fails_top1():
    reference = _outputs(batch=4)
    candidate = {k: v.copy() for k, v in reference.items()}
    winner = candidate["logits"][2].argmax()
    candidate["logits"][2, winner] = candidate["logits"][2].min() - 1.0  # row 2 changes its answer
    metrics = compare(reference, candidate)
    assert metrics["top1_agreement"] == 0.75
    report = evaluate("tensorrt", "fp32", _cases(reference, candidate))
    with pytest.raises(ParityError) as info:
        report.raise_if_failed()
    assert (info.value.metric, info.value.value, info.value.bound) == ("top1_agreement", 0.75, 1.0)


def test_fp16_cosine():
    reference = _outputs(batch=4)
    close = {k: v.astype(np.float16).astype(np.float32) for k, v in reference.items()}
    assert evaluate("onnxruntime", "fp16", _cases(reference, close)).passed

    rotated = {k: v.copy() for k, v in reference.items()}
    rotated["embeds"][1] += 0.2 * np.linalg.norm(rotated["embeds"][1])  # one row off course
    metrics = compare(reference, rotated)
    assert metrics["outputs"]["logits"]["min_cosine"] == pytest.approx(1.0)
    assert metrics["outputs"]["embeds"]["min_cosine"] < 0.999
    report = evaluate("aoti", "fp16", _cases(reference, rotated))
    assert not report.passed
    with pytest.raises(
        ParityError, match=r"aoti failed parity: min_cosine = 0\.\d+ \(bound 0\.999\)"
    ):
        report.raise_if_failed()


def test_nan_never_passes():
    reference = _outputs(batch=2)
    candidate = {k: v.copy() for k, v in reference.items()}
    candidate["embeds"][0, 3] = np.nan
    metrics = compare(reference, candidate)
    assert metrics["max_abs"] == np.inf and metrics["min_cosine"] == -1.0
    assert not evaluate("tensorrt", "fp32", _cases(reference, candidate)).passed
    assert not evaluate("tensorrt", "fp16", _cases(reference, candidate)).passed


def test_raise_if_failed_names_backend_metric_value_bound():
    reference = _outputs()
    candidate = {k: v + np.float32(3e-3) for k, v in reference.items()}
    report = evaluate(
        "onnxruntime",
        "fp32",
        [
            ("random", 8, reference, {k: v.copy() for k, v in reference.items()}),
            ("real", 7, reference, candidate),
        ],
    )
    with pytest.raises(ParityError) as info:
        report.raise_if_failed()
    error = info.value
    assert (error.backend, error.metric, error.bound) == ("onnxruntime", "max_abs", 1e-4)
    assert error.value == pytest.approx(3e-3, rel=1e-2)
    assert "worst at real inputs, batch 7" in str(error)
    assert [c.passed for c in report.checks] == [True, False]


def test_shape_mismatch_is_a_failed_check():
    reference = _outputs(batch=3)
    frozen = _outputs(batch=1)  # an exporter that froze the batch at its sample size
    with pytest.raises(
        ValueError, match=r"output 'logits' has shape \(1, 10\), reference \(3, 10\)"
    ):
        compare(reference, frozen)
    report = evaluate("onnxruntime", "fp32", [("random", 3, reference, frozen)])
    assert not report.passed and report.checks[0].metrics == {}
    with pytest.raises(ParityError, match=r"mismatched outputs = 2 \(bound 0\); output 'logits'"):
        report.raise_if_failed()
    missing = evaluate(
        "onnxruntime", "fp32", [("real", 3, reference, {"logits": frozen["logits"]})]
    )
    assert "output 'embeds' is missing" in missing.checks[0].problems


def test_empty_report_does_not_pass():
    report = evaluate("onnxruntime", "fp32", [])
    assert not report.passed
    with pytest.raises(ParityError, match="no parity checks were run"):
        report.raise_if_failed()


def test_report_json_round_trip():
    reference = _outputs()
    report = evaluate(
        "tensorrt",
        "fp16",
        [
            ("random", 8, reference, {k: v * 1.0001 for k, v in reference.items()}),
            ("real", 1, {k: v[:1] for k, v in reference.items()}, {"logits": reference["logits"]}),
        ],
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["criterion"]["min_cosine"] == 0.999
    restored = ParityReport.from_dict(data)
    assert restored == report
    assert restored.worst == report.worst and restored.passed == report.passed


@pytest.mark.parametrize("low, high, expected", [
    (1, 32, [1, 7, 32]), (1, 4, [1, 3, 4]), (1, 2, [1, 2]), (1, 1, [1]), (4, 4, [4]),
    (2, 8, [2, 7, 8]),
])
def test_parity_batches_stay_inside_the_profile(low, high, expected):
    """An engine built for batches low..high is never checked outside them (1..4 once gave 5)."""
    assert parity_batches(ExportConfig(batch_min=low, batch_opt=low, batch_max=high)) == expected
