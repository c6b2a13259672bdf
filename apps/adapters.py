"""Serving the runs of a shared export (DESIGN section 11), without any web framework.

`AdapterService` holds one `SharedPredictor` (one trunk, a branch per run) for every
request. A request names its adapter (a branch; default: the first served). Requests are
decoded in their own threads, then handed to one `TrunkBatcher` thread, which takes every
request waiting (up to `max_requests`), runs the trunk once over all their images and each
branch over its own requests' rows (`SharedPredictor.logits`), and answers each request.

Adapters are added to a live server (`add`: a run on this machine, exported into the shared
export against its trunk by the function the server was given, then loaded) and removed
(`remove`), without a restart. Per-adapter request, image, error and latency counters are
kept in a Prometheus registry of the service's own (`AdapterMetrics`).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from ..data import display_name
from ..errors import InputError, MmdeployError
from ..rows import with_run
from ..runtime.base import softmax
from ..runtime.shared import SharedPredictor
from .service import (
    Decoded,
    PixelBudget,
    Prediction,
    ServeLimits,
    check_count,
    decode_uploads,
    fill_rows,
)
from .uploads import UploadRefused

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class UnknownAdapter(InputError):
    """A request for an adapter this server does not serve (never did, or removed): 404."""


class AdapterConflict(InputError):
    """Adding an adapter already served, or removing the last one: 409."""


class AddRefused(MmdeployError):
    """`POST /adapters` when the server was not started with `--allow-add`: 403."""


class AddFailed(MmdeployError):
    """A run that could not be added (another backbone, an earlier cut, failed parity, not a
    run): 422, its message without server paths."""


def http_status(exc: MmdeployError) -> int:
    """The HTTP status a request failing with `exc` is answered with (either engine)."""
    if isinstance(exc, UnknownAdapter):
        return 404
    if isinstance(exc, AdapterConflict):
        return 409
    if isinstance(exc, AddRefused):
        return 403
    if isinstance(exc, UploadRefused):
        return exc.status
    return 400 if isinstance(exc, InputError) else 422


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/[^\s'\"/]+/[^\s'\"]*")


def without_paths(message: str) -> str:
    """`message` with each absolute path in it cut to its last part (a client sees no
    server path)."""
    return _ABSOLUTE_PATH.sub(lambda match: Path(match.group(0)).name, message)


class AdapterMetrics:
    """Prometheus counters per adapter (requests, images, failed requests, latency of a
    request from its arrival to its answer) and per trunk pass (batches, images). Requests
    for an adapter the server does not serve are counted without their name: a client
    could otherwise make a series per name it invents."""

    def __init__(self):
        self.registry = CollectorRegistry()
        label = ["adapter"]
        self.requests = Counter("mmdeploy_adapter_requests", "Requests answered, by adapter",
                                label, registry=self.registry)
        self.images = Counter("mmdeploy_adapter_images", "Images in answered requests, by "
                              "adapter", label, registry=self.registry)
        self.errors = Counter("mmdeploy_adapter_errors", "Requests that failed (no image "
                              "could be read, over a limit), by adapter", label,
                              registry=self.registry)
        self.latency = Histogram("mmdeploy_adapter_request_seconds", "Request latency "
                                 "(decode, queue, trunk and branch), by adapter", label,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.unknown = Counter("mmdeploy_unknown_adapter_requests", "Requests naming an "
                               "adapter this server does not serve", registry=self.registry)
        self.trunk_batches = Counter("mmdeploy_trunk_batches", "Trunk passes (each over the "
                                     "images of every request batched together)",
                                     registry=self.registry)
        self.trunk_images = Counter("mmdeploy_trunk_images", "Images through the trunk",
                                    registry=self.registry)

    def served(self, adapter: str, images: int, seconds: float, failed: bool) -> None:
        self.requests.labels(adapter).inc()
        self.images.labels(adapter).inc(images)
        self.latency.labels(adapter).observe(seconds)
        errors = self.errors.labels(adapter)  # a series at 0 from the first request on
        if failed:
            errors.inc()

    def snapshot(self, adapter: str) -> dict[str, int]:
        """This adapter's counts so far (for /adapters and /health)."""
        def value(metric: str) -> int:
            found = self.registry.get_sample_value(f"{metric}_total", {"adapter": adapter})
            return int(found or 0)  # None: nothing counted for this adapter yet

        return {"requests": value("mmdeploy_adapter_requests"),
                "images": value("mmdeploy_adapter_images"),
                "failed": value("mmdeploy_adapter_errors")}


@dataclass
class _Request:
    pixels: np.ndarray
    adapter: str
    answer: Future


class TrunkBatcher:
    """One thread that predicts for every request waiting: the trunk once over all their
    images, each branch over its own requests' rows. A request waits at most `wait_ms` for
    others to join it; a batch holds at most `max_requests` requests."""

    def __init__(self, predictor: SharedPredictor, metrics: AdapterMetrics,
                 max_requests: int, wait_ms: float = 2.0):
        self.predictor = predictor
        self.metrics = metrics
        self.max_requests = max_requests
        self.wait_seconds = wait_ms / 1e3
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="trunk-batcher", daemon=True)
        self._thread.start()

    def predict(self, pixels: np.ndarray, adapter: str) -> tuple[list[np.ndarray], list[int]]:
        """Probabilities and top-1 labels for `pixels` through `adapter`'s branch."""
        answer: Future = Future()
        self._queue.put(_Request(pixels, adapter, answer))
        return answer.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.wait_seconds
            while len(batch) < self.max_requests:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        served = self.predictor.branches  # removed since the request came: 404 for it
        for request in batch:
            if request.adapter not in served:
                request.answer.set_exception(_unknown(request.adapter, served))
        batch = [request for request in batch if request.adapter in served]
        if not batch:
            return
        pixels = np.concatenate([request.pixels for request in batch])
        requests, start = [], 0
        for request in batch:
            requests += [(start + k, request.adapter) for k in range(len(request.pixels))]
            start += len(request.pixels)
        try:
            logits = self.predictor.logits(pixels, requests)
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            for request in batch:
                request.answer.set_exception(exc)
            return
        self.metrics.trunk_batches.inc()
        self.metrics.trunk_images.inc(len(pixels))
        start = 0
        for request in batch:
            probs = [softmax(row) for row in logits[start:start + len(request.pixels)]]
            start += len(request.pixels)
            request.answer.set_result((probs, [int(p.argmax()) for p in probs]))


def _unknown(adapter: str, served) -> UnknownAdapter:
    return UnknownAdapter(f"no adapter {display_name(adapter)!r} on this server (it serves "
                          f"{', '.join(served) or 'none'}; GET /adapters lists them)")


class AdapterService:
    """The adapters of a shared export served together (see the module docstring).
    `add_run(path) -> name` exports a run's branch into the shared export (given by the
    command line, which may use the exporters; None: adding is refused)."""

    def __init__(self, predictor: SharedPredictor, limits: ServeLimits | None = None,
                 concurrency: int = 8, add_run: Callable[[Path], str] | None = None,
                 batch_wait_ms: float = 2.0):
        self.predictor = predictor
        self.limits = limits or ServeLimits()
        self.backend = f"{predictor.backend} (shared trunk)"
        self.metrics = AdapterMetrics()
        self.budget = PixelBudget()
        self.batcher = TrunkBatcher(predictor, self.metrics, concurrency, batch_wait_ms)
        self._add_run = add_run
        self._adding = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        return self.predictor.runs

    @property
    def default(self) -> str | None:
        return next(iter(self.predictor.branches), None)

    def branch(self, adapter: str | None):
        """The branch a request for `adapter` (None or "": the default) goes to."""
        served = self.predictor.branches
        name = adapter or self.default
        if name not in served:
            self.metrics.unknown.inc()
            raise _unknown(name or "", served)
        return served[name]

    def classify(self, uploads: list[tuple[str, object]], adapter: str | None = None,
                 thumbnails: bool = False) -> tuple[str, Prediction]:
        """Predict `(name, file or bytes)` uploads with `adapter`'s branch: (the adapter's
        name, the prediction; each row names its adapter as `run`, as `infer --shared`
        writes it). Files that fail to decode get an error row; if none decodes (or the
        request breaks a limit) an `InputError` says why."""
        started = time.perf_counter()
        branch = self.branch(adapter)
        try:
            check_count(uploads, self.limits)
            decoded: Decoded = decode_uploads(
                [(display_name(name), source) for name, source in uploads],
                self.predictor.preprocessor, self.budget, thumbnails)
            decode_done = time.perf_counter()
            probs, labels = self.batcher.predict(decoded.pixels, branch.name)
        except UnknownAdapter:
            self.metrics.unknown.inc()
            raise
        except MmdeployError:
            self.metrics.served(branch.name, len(uploads), time.perf_counter() - started, True)
            raise
        done = time.perf_counter()
        rows = [with_run(row, branch.name) for row in
                fill_rows(decoded, probs, labels, branch.class_names, self.limits.top_k)]
        self.metrics.served(branch.name, len(uploads), done - started, False)
        captions = [(image, f"{rows[p]['path']}: {rows[p]['label']} ({rows[p]['score']:.0%})")
                    for p, image in zip(decoded.positions, decoded.thumbnails, strict=True)
                    ] if thumbnails else []
        return branch.name, Prediction(rows, captions, self.backend,
                                       (decode_done - started) * 1e3, (done - decode_done) * 1e3)

    def describe(self, show_paths: bool = False) -> list[dict]:
        """Each adapter served: its name, adapter class, classes, its branch's parity
        through the trunk (worst over the checked batches) and its counts so far."""
        return [describe_branch(branch, self.metrics.snapshot(name), show_paths)
                for name, branch in self.predictor.branches.items()]

    def add(self, run: str) -> dict:
        """Export the run at server path `run` into the shared export against its trunk,
        verify it through the trunk, and serve it; its description. One add at a time."""
        if self._add_run is None:
            raise AddRefused("adding adapters is off: start the server with --allow-add")
        path = Path(run).expanduser()
        if not path.is_dir():
            raise InputError(f"{path.name or run!r}: no run folder there on the server")
        if path.name in self.predictor.branches:
            raise AdapterConflict(f"adapter {path.name!r} is served already (DELETE "
                             f"/adapters/{path.name} first to replace it)")
        with self._adding:
            try:
                name = self._add_run(path)
                branch = self.predictor.add_branch(name)
            except MmdeployError as exc:
                raise AddFailed(without_paths(str(exc))) from None
        return describe_branch(branch, self.metrics.snapshot(name))

    def remove(self, adapter: str) -> None:
        """Stop serving `adapter`; requests for it get 404 from then on. The last adapter
        stays (a server serves at least one)."""
        served = self.predictor.branches
        if adapter not in served:
            raise _unknown(adapter, served)
        if len(served) == 1:
            raise AdapterConflict(f"{adapter} is the last adapter served; a server serves one at "
                             "least")
        self.predictor.remove_branch(adapter)

    def close(self) -> None:
        self.batcher.close()


def describe_branch(branch, served: dict[str, int], show_paths: bool = False) -> dict:
    check = branch.check
    worst = check.get("worst", {})
    return {"name": branch.name, "adapter": branch.adapter,
            "run": str(branch.run_path) if show_paths else branch.run_path.name,
            "classes": branch.class_names,
            "parity": {"passed": check.get("passed"), "backend": check.get("backend"),
                       "batches": sorted({c["batch"] for c in check.get("checks", [])}),
                       **{key: worst.get(key) for key in
                          ("max_abs", "min_cosine", "top1_agreement")}},
            "served": served}
