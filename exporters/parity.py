"""Parity of an exported backend against the PyTorch model, with DESIGN section 6's bounds.

| backend                          | criterion                                             |
|----------------------------------|-------------------------------------------------------|
| onnxruntime fp32, aoti fp32      | max abs <= 1e-4 and top-1 agreement 100%              |
| tensorrt fp32                    | max abs <= 1e-3 and top-1 agreement 100%              |
| any fp16                         | cosine >= 0.999 per row (minimum over rows) and top-1 |
|                                  | agreement >= 99.5%                                    |

Figures are measured on every output (logits and embeddings); top-1 agreement on the logits.
Non-finite values count as the worst possible figure (max abs inf, cosine -1), so a NaN
never passes. The cases (`parity_inputs`) are fresh random pixels and real held-out images
at batch 1, an odd batch and the largest of the profile (`parity_batches`); `export` and
`verify` both check through `run_parity`.

A vqa run's engine takes the question's tokens too (`question_parity_inputs`): the same
batches, each at 1 token, the questions' own (padded to the batch's longest) and the
tokenizer's maximum (a question over it, cut as the tokenizer cuts it, with the others
padded to it); real images with their held-out questions, and fresh random pixels; and one
check that a question padded inside a longer batch answers as it does alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mmdeploy.config import ExportConfig
from mmdeploy.data import read_image
from mmdeploy.errors import ConfigError, ParityError
from mmdeploy.images import Preprocessor
from mmdeploy.questions import QuestionTokenizer
from mmdeploy.runs import RunConfig

Outputs = Mapping[str, np.ndarray]
Case = tuple[str, int, Outputs, Outputs]

_FP32_MAX_ABS = {"onnxruntime": 1e-4, "aoti": 1e-4, "tensorrt": 1e-3}


@dataclass(frozen=True)
class Criterion:
    """Bounds an export must meet; a None bound is not checked."""

    max_abs: float | None
    min_cosine: float | None
    min_top1_agreement: float

    def violations(self, metrics: Mapping[str, Any]) -> list[tuple[str, float, float]]:
        """(metric, value, bound) for each bound `metrics` breaks, most serious first:
        a changed answer (top-1), then absolute error, then direction (cosine)."""
        found = []
        top1 = metrics.get("top1_agreement")
        if top1 is not None and not top1 >= self.min_top1_agreement:
            found.append(("top1_agreement", top1, self.min_top1_agreement))
        if self.max_abs is not None and not metrics["max_abs"] <= self.max_abs:
            found.append(("max_abs", metrics["max_abs"], self.max_abs))
        if self.min_cosine is not None and not metrics["min_cosine"] >= self.min_cosine:
            found.append(("min_cosine", metrics["min_cosine"], self.min_cosine))
        return found


def criterion_for(backend: str, precision: str) -> Criterion:
    """DESIGN's criterion for a backend ("onnxruntime", "aoti", "tensorrt") and precision."""
    if backend not in _FP32_MAX_ABS:
        known = ", ".join(sorted(_FP32_MAX_ABS))
        raise ConfigError(f"no parity criterion for backend {backend!r} (known: {known})")
    if precision == "fp32":
        return Criterion(max_abs=_FP32_MAX_ABS[backend], min_cosine=None, min_top1_agreement=1.0)
    if precision == "fp16":
        return Criterion(max_abs=None, min_cosine=0.999, min_top1_agreement=0.995)
    raise ConfigError(f"no parity criterion for precision {precision!r} (known: fp16, fp32)")


# ---------------------------------------------------------------------------- metrics


def output_mismatches(reference: Outputs, candidate: Outputs) -> list[str]:
    """Structural differences (missing outputs, other shapes) that make figures meaningless.

    A wrong shape is a real export failure: an exporter that froze the batch size returns
    the export sample's batch whatever it is given.
    """
    problems = [f"output {name!r} is missing" for name in reference if name not in candidate]
    problems += [
        f"output {name!r} has shape {np.shape(candidate[name])}, reference {np.shape(ref)}"
        for name, ref in reference.items()
        if name in candidate and np.shape(candidate[name]) != np.shape(ref)
    ]
    return problems


def compare(reference: Outputs, candidate: Outputs, logits_key: str = "logits") -> dict[str, Any]:
    """Figures for `candidate` against `reference`, output by output.

    Returns {"outputs": {name: {"max_abs", "min_cosine"}}, "max_abs", "min_cosine" (worst
    over outputs), "top1_agreement" (fraction of rows whose argmax over `logits_key`'s last
    axis agrees; None when the reference has no such output)}. Extra candidate outputs are
    ignored. Raises ValueError listing the problems when an output is missing or has
    another shape (`evaluate` records that as a failed check instead).
    """
    problems = output_mismatches(reference, candidate)
    if problems:
        raise ValueError("; ".join(problems))
    per_output = {
        name: {
            "max_abs": _max_abs(ref, candidate[name]),
            "min_cosine": _min_row_cosine(ref, candidate[name]),
        }
        for name, ref in reference.items()
    }
    top1 = None
    if logits_key in reference:
        top1 = _top1_agreement(reference[logits_key], candidate[logits_key])
    return {
        "outputs": per_output,
        "max_abs": max((m["max_abs"] for m in per_output.values()), default=0.0),
        "min_cosine": min((m["min_cosine"] for m in per_output.values()), default=1.0),
        "top1_agreement": top1,
    }


def _rows(a: np.ndarray) -> np.ndarray:
    """View an output as (rows, features) in float64: the first axis is the batch."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(a.shape[0], -1)


def _max_abs(ref: np.ndarray, cand: np.ndarray) -> float:
    diff = np.abs(_rows(ref) - _rows(cand))
    if diff.size == 0:
        return 0.0
    return float(np.inf) if np.isnan(diff).any() else float(diff.max())


def row_cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair (rows: the first axis), the one rule for parity and
    the INT8 gate. Two all-zero rows agree (1.0), one all-zero row does not (0.0), and a row
    with a NaN or an infinity on either side scores -1.0, the lowest a cosine can be: it fails
    every bound, and a mean over rows stays a number."""
    a, b = _rows(ref), _rows(cand)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cosine = np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0)
    nonzero = (norm_a > 0) & (norm_b > 0)
    with np.errstate(invalid="ignore", over="ignore"):
        cosine[nonzero] = np.sum(a * b, axis=1)[nonzero] / (norm_a * norm_b)[nonzero]
    broken = ~(np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1) & np.isfinite(cosine))
    cosine[broken] = -1.0
    return cosine


def _min_row_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    cosine = row_cosines(ref, cand)
    return float(cosine.min()) if cosine.size else 1.0


def _top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.size == 0:
        return 1.0
    ref_top = ref.reshape(-1, ref.shape[-1]).argmax(axis=-1)
    cand_top = cand.reshape(-1, cand.shape[-1]).argmax(axis=-1)
    return float(np.mean(ref_top == cand_top))


# ---------------------------------------------------------------------------- reports


@dataclass
class ParityCheck:
    """One input kind ("random" or "real"; for a vqa engine also what the questions are) at
    one batch size (and, for a vqa engine, one number of question tokens).

    `metrics` is `compare()`'s result; `problems` lists structural mismatches, which fail
    the check and leave `metrics` empty.
    """

    inputs: str
    batch: int
    metrics: dict[str, Any]
    passed: bool
    problems: list[str] = field(default_factory=list)
    tokens: int | None = None

    @property
    def where(self) -> str:
        tokens = "" if self.tokens is None else f", {self.tokens} token(s)"
        return f"{self.inputs} inputs, batch {self.batch}{tokens}"


class CheckReport(Protocol):
    """What every export's check reports, parity or the INT8 gate (`gate.GateReport`):
    whether it passed, on which backend, its figures in one line, and its record in the
    manifest (`to_dict`, which names its `kind`)."""

    kind: ClassVar[str]
    title: ClassVar[str]  # how a log line names it: "parity", "the accuracy gate"
    backend: str

    @property
    def passed(self) -> bool: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def raise_if_failed(self) -> None: ...


@dataclass
class ParityReport:
    kind: ClassVar[str] = "parity"
    title: ClassVar[str] = "parity"
    backend: str
    precision: str
    criterion: Criterion
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when there is at least one check and every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def worst(self) -> dict[str, float | None]:
        """Worst max_abs, min_cosine and top1_agreement over the checks that have figures."""
        measured = [c.metrics for c in self.checks if c.metrics]
        top1 = [m["top1_agreement"] for m in measured if m["top1_agreement"] is not None]
        return {
            "max_abs": max((m["max_abs"] for m in measured), default=None),
            "min_cosine": min((m["min_cosine"] for m in measured), default=None),
            "top1_agreement": min(top1, default=None),
        }

    def summary(self) -> str:
        """The worst figures as one line, e.g. "max_abs 3.1e-06, top1_agreement 1"."""
        return ", ".join(f"{k} {v:.3g}" for k, v in self.worst.items() if v is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; `kind`, `passed` and `worst` are included for readers and ignored on
        load."""
        return {
            "kind": self.kind,
            "backend": self.backend,
            "precision": self.precision,
            "criterion": asdict(self.criterion),
            "checks": [asdict(c) for c in self.checks],
            "passed": self.passed,
            "worst": self.worst,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParityReport:
        return cls(
            backend=data["backend"],
            precision=data["precision"],
            criterion=Criterion(**data["criterion"]),
            checks=[ParityCheck(**c) for c in data["checks"]],
        )

    def raise_if_failed(self) -> None:
        """Raise ParityError for the most serious failure: a structural mismatch first, then
        the first violated metric (top-1, max abs, cosine) at its worst over the checks."""
        if not self.checks:
            raise ParityError(self.backend, "checks run", 0, 1, "no parity checks were run")
        broken = [c for c in self.checks if c.problems]
        if broken:
            first = broken[0]
            detail = f"{first.problems[0]} ({first.where})"
            raise ParityError(self.backend, "mismatched outputs", len(first.problems), 0, detail)
        violations = self.criterion.violations(self.worst)
        if violations:
            metric, value, bound = violations[0]
            detail = f"worst at {self._check_with(metric, value).where}"
            others = [f"{m} = {v:.3g} (bound {b:.3g})" for m, v, b in violations[1:]]
            raise ParityError(self.backend, metric, value, bound, "; ".join([detail, *others]))

    def _check_with(self, metric: str, value: float) -> ParityCheck:
        return next(c for c in self.checks if c.metrics and c.metrics[metric] == value)


def evaluate(
    backend: str, precision: str, cases: Iterable[Case], logits_key: str = "logits",
    tokens: Iterable[int | None] | None = None,
) -> ParityReport:
    """Check each `(inputs_kind, batch, reference_outputs, candidate_outputs)` case against
    DESIGN's criterion for `backend` at `precision`; never raises on a failed check.
    `tokens`: each case's number of question tokens (a vqa engine's), in order."""
    criterion = criterion_for(backend, precision)
    report = ParityReport(backend, precision, criterion)
    cases = list(cases)
    for (inputs, batch, reference, candidate), length in zip(
            cases, tokens if tokens is not None else [None] * len(cases), strict=True):
        problems = output_mismatches(reference, candidate)
        if problems:
            report.checks.append(ParityCheck(inputs, batch, {}, False, problems, length))
            continue
        metrics = compare(reference, candidate, logits_key)
        passed = not criterion.violations(metrics)
        report.checks.append(ParityCheck(inputs, batch, metrics, passed, tokens=length))
    return report


# ---------------------------------------------------------------------------- running parity


def parity_batches(config: ExportConfig) -> list[int]:
    """The profile's smallest and largest batch and an odd one (7 at most) within it."""
    largest_odd = config.batch_max - (config.batch_max % 2 == 0)
    odd = max(config.batch_min, min(7, largest_odd))
    return sorted({config.batch_min, odd, config.batch_max})


@dataclass(frozen=True)
class ParityCase:
    """One parity case: what kind of inputs, and the inputs as the engine takes them
    (pixels; for a vqa engine also input_ids and attention_mask). `alone`: the reference
    answers each row on its own, its question unpadded, so the check is that a question
    padded inside a longer batch answers as it does alone."""

    kind: str
    inputs: tuple[torch.Tensor, ...]
    alone: bool = False

    @property
    def batch(self) -> int:
        return len(self.inputs[0])

    @property
    def tokens(self) -> int | None:
        return self.inputs[1].shape[1] if len(self.inputs) > 1 else None


def parity_inputs(run: RunConfig, preprocessor: Preprocessor, batches: list[int],
                  seed: int) -> list[ParityCase]:
    """Fresh random pixels and real images (the run's held-out images) at each batch size."""
    generator = torch.Generator().manual_seed(seed)
    height, width = preprocessor.image_size
    real = preprocessor([read_image(s) for s in run.held_out_samples(max(batches))])
    cases = []
    for batch in batches:
        cases.append(ParityCase("random", (torch.randn(batch, 3, height, width,
                                                       generator=generator),)))
        cases.append(ParityCase("real", (torch.from_numpy(
            np.resize(real, (batch, *real.shape[1:]))),)))
    return cases


def parity_cases(run: RunConfig, backbone, batches: list[int], seed: int,
                 tokenizer: QuestionTokenizer | None = None) -> list[ParityCase]:
    """The cases for the run's task on its `backbone` (preprocessing, and for a vqa run
    the tokenizer: `tokenizer`, else the backbone's own at its limit)."""
    if run.task != "vqa":
        return parity_inputs(run, backbone.preprocessor, batches, seed)
    tokenizer = tokenizer or QuestionTokenizer(backbone.tokenizer, backbone.max_text_length)
    return question_parity_inputs(run, backbone.preprocessor, tokenizer, batches, seed)


def question_parity_inputs(run: RunConfig, preprocessor: Preprocessor,
                           tokenizer: QuestionTokenizer, batches: list[int],
                           seed: int) -> list[ParityCase]:
    """A vqa engine's cases: at each batch size, real held-out images with their own
    questions at 1 token, at the questions' own length (padded to the batch's longest) and
    at the tokenizer's maximum (the first question made longer than it and cut as the
    tokenizer cuts it, the others padded to it); fresh random pixels with the real
    questions; and at the odd batch, each question padded in the batch against itself
    alone (`ParityCase.alone`)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = preprocessor.image_size
    samples = run.held_out_samples(max(batches))
    if any(s.question is None for s in samples):
        raise ConfigError("a vqa run's held-out samples have no questions to check with")
    real = preprocessor([read_image(s) for s in samples])
    odd = sorted(batches)[len(batches) // 2]
    cases = []
    for batch in batches:
        rows = [i % len(samples) for i in range(batch)]
        pixels = torch.from_numpy(real[rows])
        questions = [samples[i].question for i in rows]
        typical = _tokens(tokenizer, questions)
        over = " ".join([questions[0]] * (tokenizer.max_length + 1))
        longest = _tokens(tokenizer, [over, *questions[1:]])
        first = tuple(t[:, :1].contiguous() for t in typical)
        cases += [
            ParityCase("real, 1 question token", (pixels, *first)),
            ParityCase("real, the questions padded to the longest", (pixels, *typical)),
            ParityCase("real, one question cut at the maximum, the others padded to it",
                       (pixels, *longest)),
            ParityCase("random pixels, real questions",
                       (torch.randn(batch, 3, height, width, generator=generator), *typical)),
        ]
        if batch == odd:
            cases.append(ParityCase("real, each question padded vs alone",
                                    (pixels, *typical), alone=True))
    return cases


def _tokens(tokenizer: QuestionTokenizer, questions: list[str]) -> tuple[torch.Tensor, ...]:
    encoded = tokenizer.encode(questions)
    return torch.from_numpy(encoded.input_ids), torch.from_numpy(encoded.attention_mask)


def run_parity(backend: str, precision: str, reference: Callable, candidate: Callable,
               cases: list[ParityCase]) -> ParityReport:
    """`candidate` (numpy inputs -> outputs by name) against the PyTorch `reference` on
    `cases`."""
    checks = []
    with torch.inference_mode():
        for case in tqdm(cases, desc=f"parity {backend}", unit="case", leave=False):
            expected = _reference_outputs(reference, case)
            checks.append((case.kind, case.batch, expected,
                           candidate(*(x.numpy() for x in case.inputs))))
    return evaluate(backend, precision, checks, tokens=[case.tokens for case in cases])


def _reference_outputs(reference: Callable, case: ParityCase) -> dict[str, np.ndarray]:
    if not case.alone:
        logits, embeddings = reference(*case.inputs)
        return {"logits": logits.numpy(), "embeddings": embeddings.numpy()}
    pixels, input_ids, attention_mask = case.inputs
    rows = []
    for row in range(case.batch):
        kept = attention_mask[row].bool()  # the question's own tokens, without the padding
        rows.append(reference(pixels[row:row + 1], input_ids[row:row + 1, kept],
                              attention_mask[row:row + 1, kept]))
    return {"logits": torch.cat([r[0] for r in rows]).numpy(),
            "embeddings": torch.cat([r[1] for r in rows]).numpy()}
