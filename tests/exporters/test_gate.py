"""The INT8 accuracy gate's figures and bounds, on hand-made logits."""

import numpy as np
import pytest

from mmdeploy.errors import ParityError
from mmdeploy.exporters.gate import GateBounds, GateData, GateReport, measure


def data(reference: np.ndarray, labels: list[int]) -> GateData:
    return GateData(np.zeros((len(reference), 3, 2, 2), np.float32), np.array(labels),
                    reference, "val")


REFERENCE = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]] * 3 + 1  # rows agree


def test_identical_logits_pass_with_perfect_figures():
    report = measure(data(REFERENCE, [0, 1, 2, 3, 0, 1, 2, 3, 0, 0]), REFERENCE, GateBounds())
    assert report.passed and report.agreement == 1.0
    assert report.accuracy_fp32 == report.accuracy_int8 == 0.9
    assert report.accuracy_drop_points == 0.0
    assert report.cosine_min == pytest.approx(1.0) and report.images == report.labelled == 10
    assert "top-1 agreement 100.00% on 10 images," in report.summary()


def test_one_changed_answer_in_ten_fails_agreement_and_costs_accuracy():
    candidate = REFERENCE.copy()
    candidate[0] = [0, 5, 0, 0]  # the FP32 model said class 0, correctly
    report = measure(data(REFERENCE, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]), candidate,
                     GateBounds(min_agreement=0.9, max_drop_points=5.0))
    assert report.agreement == pytest.approx(0.9)
    assert report.accuracy_drop_points == pytest.approx(10.0)
    assert [v[0] for v in report.violations] == ["accuracy_drop_points"]
    with pytest.raises(ParityError, match=r"INT8 failed the accuracy gate: "
                                          r"accuracy_drop_points = 10 \(bound 5\)"):
        report.raise_if_failed()


def test_unlabelled_images_count_for_agreement_only():
    labels = [0, 1, 2, 3, 0, -1, -1, -1, -1, -1]
    candidate = REFERENCE.copy()
    candidate[9] = [9, 0, 0, 0]  # an unlabelled image changes its answer
    report = measure(data(REFERENCE, labels), candidate, GateBounds(min_agreement=0.95))
    assert report.labelled == 5 and report.accuracy_drop_points == 0.0
    assert report.agreement == pytest.approx(0.9) and not report.passed
    assert report.violations[0][0] == "top1_agreement"


def test_nan_never_passes():
    candidate = REFERENCE.copy()
    candidate[3] = np.nan
    report = measure(data(REFERENCE, [-1] * 10), candidate, GateBounds(min_agreement=0.5))
    assert report.accuracy_drop_points is None
    assert report.cosine_min == -1.0
    assert report.agreement == pytest.approx(0.9)  # the NaN row counts as a changed answer


def test_report_round_trips_through_json():
    report = measure(data(REFERENCE, [0] * 10), REFERENCE, GateBounds(0.97, 0.5))
    again = GateReport.from_dict(report.to_dict())
    assert again == report and again.to_dict()["passed"] is True
    assert again.backend == "onnxruntime int8"
