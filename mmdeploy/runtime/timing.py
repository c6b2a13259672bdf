"""Timing a backend, shared by `mmdeploy bench` and `mmdeploy export --format auto`, and the
timing an export record keeps of it (`RecordedTiming`).

No torch at import: `pick_backend` asks `device_name` which device model it runs on, and on
a CPU that must not load torch. torch is imported where a CUDA device is timed or named.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import RecordedTiming

Outputs = dict[str, np.ndarray]


@dataclass
class Runner:
    """One backend ready to run one model: host pixels in, host outputs out."""

    backend: str
    device: str
    precision: str
    run: Callable[[np.ndarray], Outputs]


TYPICAL_QUESTIONS = ("what color is the shape?", "is there a red circle in the image?")
"""Two typical questions (easy-VQA's wording, at most 9 words): a vqa engine is timed, and
traced, on these."""


def typical_questions(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask [batch, T] of the typical questions, alternated, padded to the
    longer (`tokenizer`: a `QuestionTokenizer`)."""
    encoded = tokenizer.encode([TYPICAL_QUESTIONS[row % 2] for row in range(batch)])
    return encoded.input_ids, encoded.attention_mask


def with_questions(runner: Runner, tokenizer) -> Runner:
    """A vqa engine's `runner` (pixels, input_ids, attention_mask -> outputs) timed on pixels
    alone: each call asks the typical questions, tokenized beforehand, so the timing is the
    engine's, not the tokenizer's."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def run(pixels: np.ndarray) -> Outputs:
        batch = len(pixels)
        if batch not in cache:
            cache[batch] = typical_questions(tokenizer, batch)
        return runner.run(pixels, *cache[batch])

    return Runner(runner.backend, runner.device, runner.precision, run)


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    images_per_s: float
    peak_rss_mb: float | None
    cuda_peak_mb: float | None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure(runner: Runner, pixels: np.ndarray, warmup: int, iters: int) -> Timing:
    """Warm up, then time `iters` calls; memory peaks are taken over the timed calls."""
    for _ in range(warmup):
        runner.run(pixels)
    cuda = runner.device == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        runner.run(pixels)  # outputs come back to the host: the work is done when it returns
        times.append((time.perf_counter() - started) * 1e3)
    median = statistics.median(times)
    return Timing(
        median_ms=round(median, 4),
        p90_ms=round(float(np.percentile(times, 90)), 4),
        images_per_s=round(len(pixels) / median * 1e3, 2),
        peak_rss_mb=round(_peak_rss_mb(), 1) if reset else None,
        cuda_peak_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    )


def predictor_runner(run_path: str | Path, backend: str) -> Runner:
    """The run's verified export on `backend`, through its runtime predictor; raises with
    the reason when it cannot run here."""
    from . import load_predictor, pick_backend

    pick_backend(run_path, backend)
    predictor = load_predictor(run_path, backend)
    if predictor.task == "vqa":
        return with_questions(Runner(backend, predictor.device, predictor.precision,
                                     predictor.run_questions), predictor.question_tokenizer)
    return Runner(backend, predictor.device, predictor.precision, predictor.run_pixels)


def cpu_name() -> str:
    """The CPU's model string ("model name" in /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The model of `device` ("cpu", or "cuda": the first GPU, the one predictors use)."""
    if device == "cpu":
        return cpu_name()
    import torch

    return torch.cuda.get_device_name(0)


def recorded(device: str, batch: int, median_ms: float, source: str) -> RecordedTiming:
    """A timing on `device` of this machine, as an export record keeps it, made now."""
    return RecordedTiming(
        device=device, device_name=device_name(device), batch=batch, median_ms=median_ms,
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source=source)
