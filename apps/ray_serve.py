"""Online serving on Ray Serve (DESIGN section 9): `mmdeploy serve RUN --engine ray`.

N replicas, each holding one predictor (a `Classifier`, as in the Gradio app), behind Ray
Serve's HTTP proxy:

    POST /predict  multipart/form-data, one `files` part per image
                   (curl -F files=@cat.jpg -F files=@dog.png URL/predict); a vqa run's
                   request also has `question` fields: one that asks every image, or one
                   per image in upload order (-F question="what color is the shape?"):
                   200 {"rows": [the `mmdeploy infer` row of each image, in upload order],
                   "backend": ...}; an image that does not decode gets its error row.
                   422 {"error": ...} for a question that cannot be asked (empty, not
                   UTF-8, absurdly long, none or too many for a vqa run, any for a
                   classification run), before any image is decoded;
                   400 {"error": ...} when no image decodes or a request breaks a limit,
                   413 for a body, a file or a file count over the limits (checked as the
                   body streams in: see `uploads`), 411 for a body that does not say its
                   length, 503 when the queue is full.
    GET  /health   status, backend, this replica's id and counters
    GET  /info     the run (as `mmdeploy info --json`) and how it is served

An upload goes through the steps `infer` takes for a file (`load_image`,
`Preprocessor.check`, the preprocessor, `rows.prediction_row` / `rows.error_row`), so it
gets the row `infer` writes for that file (scores equal to about 1e-6: the batch it is
predicted in differs). Decoding runs per request in a thread; prediction is batched across
the requests a replica holds (`serve.batch`: up to --concurrency requests, waiting at most
--batch-wait-ms for more), one model call per batch.

Back-pressure is Ray Serve's own: a replica takes --concurrency requests at once
(`max_ongoing_requests`), each caller (the HTTP proxy) queues up to --max-queue more
(`max_queued_requests`) and answers 503 beyond. Parsing multipart bodies needs the
python-multipart package.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' types
# (`request: Request`) at run time, and in a Serve replica string annotations do not resolve.
import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ..errors import InputError
from ..inference.ray_cluster import PredictorSpec, RayOptions, gpus_per_worker, ray_session
from ..runtime import pick_backend
from ..runtime.base import Answers
from .listen import bind
from .service import Classifier, ServeLimits, pair_questions
from .uploads import UploadRefused, read_parts, uploaded_files

QUESTION_FIELD = "question"


class QuestionRefused(InputError):
    """A request's questions do not fit the run (422). Defined above the deployment: in a
    Serve replica, a name defined below it was not found (NameError)."""

    status = 422

APP_NAME = "mmdeploy"
QUIET = {"log_level": "WARNING", "enable_access_log": False}
# Serve's controller gives a starting HTTP proxy 5 s (Ray's default) to report ready, then
# kills it, and `serve.start` fails with ActorDiedError: seen on a 2-core machine under load.
# A local Ray's actors inherit this process's environment; a joined cluster keeps its own.
PROXY_READY_VARIABLE, PROXY_READY_SECONDS = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"


@dataclass(frozen=True)
class RayServeConfig:
    """How the run is served. Each replica takes `concurrency` requests at once and predicts
    them in batches of up to that many requests; each proxy queues `max_queue` more."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    concurrency: int = 2
    max_queue: int = 64
    batch_wait_ms: float = 10.0
    limits: ServeLimits = ServeLimits()
    precision: str = "fp32"
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray
    graceful_seconds: float = 30.0  # for a replica's requests in flight at shutdown
    show_paths: bool = False  # the run's and backbone's server paths in /health and /info


api = FastAPI(title="mmdeploy (Ray Serve)")


@serve.deployment(name="classifier")
@serve.ingress(api)
class ClassifierDeployment:
    """One replica: a `Classifier` (run + predictor, loaded once) behind the HTTP routes."""

    def __init__(self, run_path: str, backend: str, config: RayServeConfig):
        self.classifier = Classifier(run_path, backend, config.limits, config.precision)
        self.limits = config.limits
        self.details = self.classifier.public_details(config.show_paths)
        self.serving = {key: value for key, value in asdict(config).items()
                        if key not in ("address", "limits", "show_paths")}
        self.serving["limits"] = config.limits.describe()
        for batched in (self.predict_batch, self.answer_batch):
            batched.set_max_batch_size(config.concurrency)
            batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1e3)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        uploads: list[tuple[str, bytes]] = []
        try:
            uploads, questions = await self._uploads(request)
            asked = self._questions(questions, len(uploads))
            decoded = await asyncio.to_thread(self.classifier.decode, uploads)
            if asked is None:
                rows = self.classifier.fill_rows(decoded, *await self.predict_batch(
                    decoded.pixels))
            else:
                answers = await self.answer_batch(
                    (decoded.pixels, [asked[position] for position in decoded.positions]))
                rows = self.classifier.fill_answer_rows(decoded, asked, answers)
        except InputError as exc:
            self.classifier.counters.add(len(uploads), failed=True)
            status = exc.status if isinstance(exc, UploadRefused | QuestionRefused) else 400
            return JSONResponse({"error": str(exc)}, status_code=status)
        self.classifier.counters.add(len(rows), failed=False)
        return JSONResponse({"rows": rows, "backend": self.classifier.backend})

    def _questions(self, questions: list[bytes], count: int) -> list[str] | None:
        """A vqa run's question for each of `count` images (`pair_questions`); None for a
        classification run, which takes none. `QuestionRefused` (422) otherwise."""
        try:
            if self.classifier.task == "vqa":
                return pair_questions(questions, count)
            if questions:
                raise InputError(f"this is a {self.classifier.task} run: it takes images, "
                                 f"not questions (drop the `{QUESTION_FIELD}` field)")
            return None
        except InputError as exc:
            raise QuestionRefused(str(exc)) from None

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "run": self.details["run"], "adapter": self.details["adapter"],
                "backend": self.classifier.backend,
                "classes": len(self.classifier.class_names),
                "replica": serve.get_replica_context().replica_id.unique_id,
                "served": self.classifier.counters.snapshot()}

    @api.get("/info")
    def info(self) -> dict:
        return {**self.details, "backend": self.classifier.backend,
                "serving": self.serving}

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def predict_batch(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """(probs, labels) for each request's pixels, from one model call over all of them
        (in chunks the export's batch range allows), in a thread: the replica keeps taking
        requests meanwhile."""
        probs, labels = await asyncio.to_thread(self.classifier.predictor.predict_pixels,
                                                 np.concatenate(requests))
        bounds = np.cumsum([len(pixels) for pixels in requests])[:-1]
        return list(zip(np.split(probs, bounds), np.split(labels, bounds), strict=True))

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def answer_batch(self, requests: list[tuple[np.ndarray, list[str]]]) -> list[Answers]:
        """`predict_batch` for a vqa run: each request's pixels and checked questions, one
        model call over all of them."""
        answers = await asyncio.to_thread(
            self.classifier.predictor.predict_question_pixels,
            np.concatenate([pixels for pixels, _ in requests]),
            [question for _, questions in requests for question in questions])
        results, start = [], 0
        for pixels, _ in requests:
            end = start + len(pixels)
            results.append(Answers(answers.probs[start:end], answers.labels[start:end],
                                   answers.truncated[start:end]))
            start = end
        return results

    async def _uploads(self, request: Request) -> tuple[list[tuple[str, bytes]], list[bytes]]:
        """The request's `files` parts as (display name, bytes), and its `question` fields
        as sent (bytes: `check_question` says which are not UTF-8). The body's size, its part
        count and each part's size are checked as it streams in (`read_parts`), so an
        oversized request is refused before it is buffered."""
        parts = await read_parts(request, self.limits)
        uploads = uploaded_files(parts)
        if not uploads:
            raise InputError("no image uploaded: send each image as a multipart/form-data "
                             "part named `files`")
        return uploads, [part.data for part in parts
                         if part.filename is None and part.name == QUESTION_FIELD]


def serve_on_ray(run_path: str | os.PathLike, backend: str | None, config: RayServeConfig,
                 on_ready: Callable[[str], None], log: Callable[[str], None]) -> None:
    """Serve the run until SIGINT or SIGTERM, then delete the app and return (a local Ray,
    Serve's controller and proxies included, stops with it; on a joined cluster only our
    app goes, other apps and Serve itself stay). The backend
    is chosen here as for `infer` (`backend` None: the fastest present) and loaded once here
    to check it before any replica starts."""
    chosen, skipped = pick_backend(run_path, backend, config.precision)
    for reason in skipped:
        log(f"not using {reason}")
    spec = PredictorSpec.load(run_path, chosen, config.precision)
    log(f"backend: {spec.description}")
    run_until_stopped(ClassifierDeployment, spec, (spec.run_path, spec.backend, config), config,
                      on_ready, log)


def run_until_stopped(deployment, spec, bind_args: tuple, config: RayServeConfig,
                      on_ready: Callable[[str], None], log: Callable[[str], None]) -> None:
    """Run `deployment` (bound to `bind_args`; its replicas load `spec`) as this process's
    Serve app until SIGINT or SIGTERM, then delete the app: the start-up and shutdown every
    Ray Serve engine here shares (one run, or a shared export's adapters)."""
    port = _check_port(config.host, config.port)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # we print the URL ourselves
    os.environ.setdefault(PROXY_READY_VARIABLE, PROXY_READY_SECONDS)  # a user's setting wins
    with ray_session(RayOptions(address=config.address)) as session:
        log(session.describe())
        gpus = gpus_per_worker(spec, session, config.replicas, "replica")
        replicas = deployment.options(
            num_replicas=config.replicas, max_ongoing_requests=config.concurrency,
            max_queued_requests=config.max_queue,
            graceful_shutdown_timeout_s=config.graceful_seconds,
            ray_actor_options={"num_cpus": min(1.0, session.cpus / config.replicas),
                               "num_gpus": gpus})
        serve.start(http_options={"host": config.host, "port": port}, logging_config=QUIET)
        try:
            serve.run(replicas.bind(*bind_args), name=APP_NAME, route_prefix="/",
                      logging_config=QUIET)
            host = f"[{config.host}]" if ":" in config.host else config.host
            on_ready(f"http://{host}:{port}/")
            _wait_for_stop()
        finally:
            serve.delete(APP_NAME)  # replicas finish their requests; Serve itself stays up


def _check_port(host: str, port: int) -> int:
    """The port Serve will listen on, checked free first (`bind`); 0 picks a free one. (Serve
    binds it a moment later: another program could take it in between.)"""
    with bind(host, port) as probe:
        return probe.getsockname()[1]


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM (the handlers only set an event: the shutdown runs
    here, in the main thread, not inside a signal handler)."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
