"""The HTTP server of a shared export (`mmdeploy serve --shared DIR`): many adapters, one
trunk (DESIGN section 11), beside the Gradio page.

    GET    /health                      status, backend, adapters, counts
    GET    /adapters                    each adapter: class, classes, parity, counts
    POST   /adapters                    {"run": "/path/to/run"}: add one (--allow-add only)
    DELETE /adapters/NAME               stop serving NAME
    POST   /predict                     multipart: `files` parts, optional `adapter` field
    POST   /adapters/NAME/predict       multipart: `files` parts
    GET    /metrics                     Prometheus text format

A request for an adapter the server does not serve is answered 404. Uploads are read within
the server's limits as they stream in (`uploads.read_form`); at most `concurrency +
max_queue` prediction requests are taken at once, more are answered 503. No response shows
a server path unless the server was started with --show-paths.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from gradio.route_utils import API_PREFIX
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..artifacts import RunDir
from ..errors import MmdeployError
from ..runs import load_run_config
from .adapters import AdapterService, http_status
from .examples import examples_or_reason
from .server import ServeConfig, ServedApp, mount_page
from .ui import build_adapters_ui
from .uploads import UploadLimitMiddleware, read_form


def _reads_own_body(method: str, path: str) -> bool:
    """The prediction routes read their uploads within the limits (`read_form`); removing an
    adapter reads no body."""
    if method == "DELETE":
        return path.startswith("/adapters/")
    return path == "/predict" or (path.startswith("/adapters/") and path.endswith("/predict"))


class _Admission:
    """Counts prediction requests in the server; refuses one beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._taken >= self.capacity:
                return False
            self._taken += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._taken -= 1


def _error(exc: MmdeployError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=http_status(exc))


def build_shared_app(service: AdapterService, config: ServeConfig,
                     examples_dir: Path) -> ServedApp:
    """The FastAPI app (routes in the module docstring) plus the Gradio page at `/`, behind
    the upload limits; no API docs routes. The page's examples come from the default
    adapter's run."""
    default = service.branch(None)
    try:
        run = load_run_config(RunDir(default.run_path))
    except MmdeployError as exc:
        examples, note = [], f"no examples: {exc}"
    else:
        examples, note = examples_or_reason(run, examples_dir)
    blocks = build_adapters_ui(service, examples, note, show_paths=config.show_paths)
    blocks.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)
    app = FastAPI(title="mmdeploy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimitMiddleware, upload_path=f"{API_PREFIX}/upload",
                       limits=config.limits, reads_own_body=_reads_own_body)
    admission = _Admission(config.concurrency + config.max_queue)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "backend": service.backend, "adapters": service.adapters,
                "default": service.default, "concurrency": config.concurrency,
                "served": {name: service.metrics.snapshot(name) for name in service.adapters}}

    @app.get("/adapters")
    def adapters() -> dict:
        return {"default": service.default, "adapters": service.describe(config.show_paths)}

    @app.post("/adapters")
    async def add(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("run"), str):
            return JSONResponse({"error": 'send {"run": "<path of a run on the server>"}'},
                                status_code=400)
        try:
            added = await asyncio.to_thread(service.add, body["run"])
        except MmdeployError as exc:
            return _error(exc)
        return JSONResponse(added, status_code=201)

    @app.delete("/adapters/{name}")
    def remove(name: str) -> JSONResponse:
        try:
            service.remove(name)
        except MmdeployError as exc:
            return _error(exc)
        return JSONResponse({"removed": name, "adapters": service.adapters})

    async def predict(request: Request, adapter: str | None) -> JSONResponse:
        if not admission.take():
            return JSONResponse({"error": "the server is busy (queue full); try again"},
                                status_code=503)
        try:
            service.branch(adapter)  # a 404 before the body is read
            uploads, fields = await read_form(request, config.limits)
            name, result = await asyncio.to_thread(service.classify, uploads,
                                                   adapter or fields.get("adapter"))
        except MmdeployError as exc:
            return _error(exc)
        finally:
            admission.give()
        return JSONResponse({"adapter": name, "rows": result.rows, "backend": result.backend,
                             "decode_ms": result.decode_ms, "model_ms": result.model_ms})

    @app.post("/predict")
    async def predict_default(request: Request) -> JSONResponse:
        return await predict(request, None)

    @app.post("/adapters/{name}/predict")
    async def predict_named(name: str, request: Request) -> JSONResponse:
        return await predict(request, name)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return mount_page(app, blocks, config, examples_dir)
