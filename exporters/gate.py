"""The INT8 accuracy gate: does a quantized graph still give the FP32 model's answers?

FP32 and FP16 exports are held to closeness of every output (`parity.py`). INT8 cannot be:
its logits move by a few percent by design. What a user ships on is the answer, so the
gate measures answers, against the FP32 PyTorch model, on real images (the run's
validation split, plus the held-out images parity uses):

- top-1 agreement: the share of images whose INT8 label is the FP32 model's label;
- accuracy drop: FP32 accuracy minus INT8 accuracy on the labelled validation images, in
  points (None when the run's validation split is not there to label them);
- logit cosine per row (min and mean): reported, not bounded; it says how far the logits
  moved when the labels did not.

Bounds default to DESIGN's promise (agreement >= 99%, drop <= 1 point). A NaN never passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from mmdeploy.data import Sample, read_image
from mmdeploy.errors import MmdeployError, ParityError
from mmdeploy.images import Preprocessor
from mmdeploy.questions import QuestionTokenizer
from mmdeploy.runs import RunConfig

from .parity import row_cosines

BACKEND = "onnxruntime int8"
MAX_IMAGES = 1000  # spread over the validation split's classes; enough for 0.1% steps
REAL_IMAGES = 32  # parity's real images (held-out, validation and test) added to them
BATCH = 32


class GateError(ParityError):
    """An INT8 graph broke a bound of the accuracy gate (a ParityError: it is not served)."""

    def __init__(self, metric: str, value: float, bound: float, detail: str = ""):
        super().__init__(BACKEND, metric, value, bound, detail)
        message = f"INT8 failed the accuracy gate: {metric} = {value:.4g} (bound {bound:.4g})"
        self.args = (f"{message}; {detail}" if detail else message,)


@dataclass(frozen=True)
class GateBounds:
    """What an INT8 graph must meet to be published."""

    min_agreement: float = 0.99
    max_drop_points: float = 1.0


@dataclass
class GateData:
    """Preprocessed gate images, their labels (-1: unlabelled) and the FP32 model's logits;
    a vqa run's also the questions asked of them (input_ids, attention_mask), the labels
    their answers."""

    pixels: np.ndarray
    labels: np.ndarray
    reference: np.ndarray
    split: str  # where the labelled images come from ("val"), or "none"
    questions: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def inputs(self) -> tuple[np.ndarray, ...]:
        """What the engine takes: the pixels (and the questions' tokens)."""
        return (self.pixels, *(self.questions or ()))


@dataclass
class GateReport:
    """The gate's figures for one INT8 graph, and the bounds they were held to."""

    kind: ClassVar[str] = "gate"
    title: ClassVar[str] = "the accuracy gate"

    agreement: float
    accuracy_fp32: float | None
    accuracy_int8: float | None
    accuracy_drop_points: float | None
    cosine_min: float
    cosine_mean: float
    images: int  # samples measured: images, or a vqa run's image + question pairs
    labelled: int
    bounds: GateBounds = field(default_factory=GateBounds)
    backend: str = BACKEND  # what was measured: ONNX Runtime's INT8 graph, or an INT8 engine
    unit: str = "images"  # what `images` counts, as the summary names it

    @property
    def violations(self) -> list[tuple[str, float, float]]:
        """(metric, value, bound) for each bound broken: a changed answer first."""
        found = []
        if not self.agreement >= self.bounds.min_agreement:
            found.append(("top1_agreement", self.agreement, self.bounds.min_agreement))
        drop = self.accuracy_drop_points
        if drop is not None and not drop <= self.bounds.max_drop_points:
            found.append(("accuracy_drop_points", drop, self.bounds.max_drop_points))
        return found

    @property
    def passed(self) -> bool:
        return self.images > 0 and not self.violations

    def summary(self) -> str:
        drop = self.accuracy_drop_points
        drop_text = "not measured" if drop is None else f"{drop:+.2f} points"
        return (f"top-1 agreement {self.agreement:.2%} on {self.images} {self.unit}, accuracy drop "
                f"{drop_text}, logit cosine min {self.cosine_min:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateReport:
        figures = {k: v for k, v in data.items() if k not in ("kind", "passed", "bounds")}
        return cls(**figures, bounds=GateBounds(**data.get("bounds", {})))

    def raise_if_failed(self, detail: str = "") -> None:
        if self.images == 0:
            raise GateError("images", 0, 1, "no image to measure the gate on")
        if self.violations:
            metric, value, bound = self.violations[0]
            raise GateError(metric, value, bound, detail)


def gate_samples(run: RunConfig) -> tuple[list[Sample], int]:
    """The gate's images and how many of them (the first ones) are labelled validation
    images; parity's real held-out images follow, unlabelled for the accuracy figures."""
    try:
        val = run.splits().val
    except MmdeployError:
        val = []  # the training data is gone: agreement on the bundled real images only
    val = val[:: max(1, -(-len(val) // MAX_IMAGES))]
    names = {s.name for s in val}
    extra = [s for s in run.held_out_samples(REAL_IMAGES) if s.name not in names]
    return val + extra, len(val)


def gate_data(run: RunConfig, reference: torch.nn.Module,
              preprocessor: Preprocessor) -> GateData:
    """Gate images through the serving preprocessing, with the FP32 PyTorch model's logits;
    for a vqa run each held-out image with its question (tokenized as served, by the
    backbone's tokenizer at its limit), its answer the label: the gate is on VQA accuracy."""
    samples, labelled = gate_samples(run)
    pixels = preprocessor([read_image(s) for s in samples])
    labels = np.array([s.label if i < labelled else -1 for i, s in enumerate(samples)])
    questions = None
    if run.task == "vqa":
        backbone = reference.backbone
        encoded = QuestionTokenizer(backbone.tokenizer, backbone.max_text_length).encode(
            [s.question for s in samples])
        questions = (encoded.input_ids, encoded.attention_mask)
    data = GateData(pixels, labels, np.empty(0), "val" if labelled else "none", questions)
    with torch.inference_mode():
        data.reference = candidate_logits(
            lambda *x: {"logits": reference(*map(torch.from_numpy, x))[0].numpy()},
            data.inputs)
    return data


def candidate_logits(run: Callable[..., Mapping[str, np.ndarray]],
                     inputs: np.ndarray | tuple[np.ndarray, ...],
                     batch: int = BATCH) -> np.ndarray:
    """`run` (the engine's inputs -> outputs by name) over `inputs` (pixels, or a tuple of
    arrays with the same rows: a vqa engine's pixels and question tokens) in batches of
    `batch`: its logits."""
    arrays = inputs if isinstance(inputs, tuple) else (inputs,)
    return np.concatenate([run(*(a[i:i + batch] for a in arrays))["logits"]
                           for i in range(0, len(arrays[0]), batch)])


def gate_check(run: RunConfig, reference: torch.nn.Module,
               candidate: Callable[[np.ndarray], Mapping[str, np.ndarray]], bounds: GateBounds,
               backend: str, batch: int = BATCH) -> GateReport:
    """The gate's figures for an INT8 engine (pixels -> outputs by name), in batches its
    profile takes."""
    data = gate_data(run, reference, reference.backbone.preprocessor)
    report = measure(data, candidate_logits(candidate, data.inputs, min(batch, BATCH)), bounds)
    report.backend = backend
    return report


def measure(data: GateData, logits: np.ndarray, bounds: GateBounds) -> GateReport:
    """The gate's figures for `logits` (the INT8 graph's, on `data.pixels`)."""
    reference = data.reference.astype(np.float64)
    candidate = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(candidate).all(axis=1)
    agrees = (reference.argmax(1) == candidate.argmax(1)) & finite
    labelled = data.labels >= 0
    accuracy_fp32 = accuracy_int8 = drop = None
    if labelled.any():
        truth = data.labels[labelled]
        accuracy_fp32 = float(np.mean(reference[labelled].argmax(1) == truth))
        accuracy_int8 = float(np.mean((candidate[labelled].argmax(1) == truth)
                                      & finite[labelled]))
        drop = round((accuracy_fp32 - accuracy_int8) * 100, 6)
    cosine = row_cosines(reference, candidate)
    return GateReport(
        agreement=float(agrees.mean()) if len(agrees) else 0.0,
        accuracy_fp32=accuracy_fp32, accuracy_int8=accuracy_int8, accuracy_drop_points=drop,
        cosine_min=float(cosine.min()) if len(cosine) else 1.0,
        cosine_mean=float(cosine.mean()) if len(cosine) else 1.0,
        images=len(data), labelled=int(labelled.sum()), bounds=bounds,
        unit="images" if data.questions is None else "image + question pairs")
