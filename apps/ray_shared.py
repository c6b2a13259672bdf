"""Many adapters, one trunk, on Ray Serve (DESIGN sections 9 and 11):
`mmdeploy serve --shared DIR --engine ray`.

N replicas, each holding one `AdapterService` (one `SharedPredictor`: the trunk and a
branch per run of DIR), behind Ray Serve's HTTP proxy, with the gradio engine's API:

    POST /predict                   multipart: `files` parts, optional `adapter` field
                                    (default: the first adapter)
    POST /adapters/NAME/predict     multipart: `files` parts
                                    200 {"adapter", "rows", "backend", "decode_ms",
                                    "model_ms"}; 404 for an adapter not served, 400/413/411
                                    as for one run (`uploads`), 503 when the queue is full
    GET  /adapters                  each adapter: class, classes, parity, this replica's counts
    GET  /health                    status, backend, adapters, this replica's id and counts
    GET  /metrics                   Prometheus text, this replica's counters

A replica decodes each request in a thread and hands it to its `TrunkBatcher`, which runs
the trunk once over the images of every request waiting (up to --concurrency, the requests
a replica takes at once) and each branch over its own requests' rows. The adapters served
are fixed at start: adding or removing one (`POST /adapters`, `DELETE /adapters/NAME`) is
answered 405 in one line, since each replica holds its own branches and a change would
reach only the replica that took the request (serve with --engine gradio for that).
Counters are per replica: /metrics and /health show the replica that answered.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' types
# at run time, and in a Serve replica string annotations do not resolve (see ray_serve).
import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve

from ..errors import MmdeployError
from ..runtime.shared import SharedPredictor
from .adapters import AdapterService, http_status
from .ray_serve import RayServeConfig, run_until_stopped
from .uploads import read_form

FIXED = ("adapters are fixed at start on --engine ray (each replica holds its own branches); "
         "serve with --engine gradio --allow-add to add or remove them on a live server")


@dataclass(frozen=True)
class SharedSpec:
    """The shared export as the replicas load it, checked once on the driver first (a bad
    export is one error line before any Ray process starts)."""

    shared_dir: str
    backend: str
    runs: tuple[str, ...]
    description: str
    device: str

    @classmethod
    def load(cls, shared_dir: str | os.PathLike, backend: str | None,
             runs: list[str] | None) -> "SharedSpec":
        predictor = SharedPredictor(shared_dir, backend, runs)
        return cls(str(predictor.dir.resolve()), predictor.backend, tuple(predictor.runs),
                   predictor.describe(), predictor.device)

    @property
    def gpu(self) -> bool:  # as `PredictorSpec.gpu`, for `gpus_per_worker`
        return self.device == "cuda"


shared_api = FastAPI(title="mmdeploy shared trunk (Ray Serve)")


@serve.deployment(name="adapters")
@serve.ingress(shared_api)
class SharedDeployment:
    """One replica: an `AdapterService` over the shared export, behind the HTTP routes."""

    def __init__(self, spec: SharedSpec, config: RayServeConfig):
        predictor = SharedPredictor(spec.shared_dir, spec.backend, list(spec.runs))
        self.service = AdapterService(predictor, config.limits, config.concurrency,
                                      add_run=None, batch_wait_ms=config.batch_wait_ms)
        self.config = config

    @shared_api.post("/predict")
    async def predict_default(self, request: Request) -> JSONResponse:
        return await self._predict(request, None)

    @shared_api.post("/adapters/{name}/predict")
    async def predict_named(self, name: str, request: Request) -> JSONResponse:
        return await self._predict(request, name)

    @shared_api.get("/adapters")
    def adapters(self) -> dict:
        return {"default": self.service.default,
                "adapters": self.service.describe(self.config.show_paths)}

    @shared_api.post("/adapters")
    def add(self) -> JSONResponse:
        return JSONResponse({"error": FIXED}, status_code=405)

    @shared_api.delete("/adapters/{name}")
    def remove(self, name: str) -> JSONResponse:
        return JSONResponse({"error": FIXED}, status_code=405)

    @shared_api.get("/health")
    def health(self) -> dict:
        service = self.service
        return {"status": "ok", "backend": service.backend, "adapters": service.adapters,
                "default": service.default, "concurrency": self.config.concurrency,
                "replica": serve.get_replica_context().replica_id.unique_id,
                "served": {name: service.metrics.snapshot(name) for name in service.adapters}}

    @shared_api.get("/metrics")
    def metrics(self) -> Response:
        return Response(generate_latest(self.service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    async def _predict(self, request: Request, adapter: str | None) -> JSONResponse:
        try:
            self.service.branch(adapter)  # a 404 before the body is read
            uploads, fields = await read_form(request, self.config.limits)
            name, result = await asyncio.to_thread(self.service.classify, uploads,
                                                   adapter or fields.get("adapter"))
        except MmdeployError as exc:
            return JSONResponse({"error": str(exc)}, status_code=http_status(exc))
        return JSONResponse({"adapter": name, "rows": result.rows, "backend": result.backend,
                             "decode_ms": result.decode_ms, "model_ms": result.model_ms})

    def __del__(self) -> None:
        self.service.close()


def serve_shared_on_ray(shared_dir: str | os.PathLike, backend: str | None,
                        runs: list[str] | None, config: RayServeConfig,
                        on_ready: Callable[[str], None], log: Callable[[str], None]) -> None:
    """Serve the shared export until SIGINT or SIGTERM, then delete the app and return (as
    `ray_serve.serve_on_ray` does for one run)."""
    spec = SharedSpec.load(shared_dir, backend, runs)
    log(f"backend: {spec.description}")
    run_until_stopped(SharedDeployment, spec, (spec, config), config, on_ready, log)
