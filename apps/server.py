"""The HTTP server: FastAPI with `GET /health`, the Gradio page mounted at `/`, uvicorn.

We mount the page on our own FastAPI app (`gr.mount_gradio_app`) instead of calling
`Blocks.launch()` so that the health route sits beside it and uvicorn runs in the main
thread: uvicorn then handles SIGINT and SIGTERM itself (stop accepting, let requests in
flight finish, run the shutdown hooks). `launch()` only catches KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI
from gradio.route_utils import API_PREFIX
from starlette.applications import Starlette
from starlette.routing import Mount
from uvicorn.protocols.http.h11_impl import H11Protocol

from .examples import examples_or_reason, question_examples_or_reason
from .service import Classifier, ServeLimits
from .ui import build_ui, build_vqa_ui
from .uploads import UploadLimitMiddleware

HEADER_TIMEOUT_SECONDS = 10.0
"""How long a connection may take to send a whole request head (see `_HeadDeadline`)."""


@dataclass(frozen=True)
class ServeConfig:
    """How the app is served. `concurrency` requests run at once (each may hold up to
    `limits.max_images` images); up to `max_queue` more wait, later ones are refused. On
    SIGINT/SIGTERM requests in flight get `graceful_seconds` to finish. Clients see no server
    path (the run by its folder's name) unless `show_paths`."""

    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 2
    max_queue: int = 64
    limits: ServeLimits = ServeLimits()
    graceful_seconds: float = 30.0
    show_paths: bool = False

    @property
    def max_connections(self) -> int:
        """Open connections and tasks beyond which uvicorn answers 503: each queued or
        running request holds about two (its call and its event stream), a browser tab one
        more, with room for health checks."""
        return 4 * (self.concurrency + self.max_queue) + 64


@dataclass
class ServedApp:
    """The ASGI app to run, and how to end Gradio's long-lived streams at shutdown."""

    app: FastAPI
    gradio_app: Starlette

    def end_streams(self) -> None:
        """Gradio holds a heartbeat stream open per browser tab or client until its
        `stop_event` is set (`launch()` does that on close; a mounted app must do it itself),
        and uvicorn's graceful shutdown waits for every open connection."""
        self.gradio_app.stop_event.set()


def build_app(classifier: Classifier, config: ServeConfig, examples_dir: Path) -> ServedApp:
    """The FastAPI app: `/health` plus the Gradio page (with its queue) at `/`, behind the
    upload limits; no API docs routes."""
    run = classifier.predictor.run
    if classifier.task == "vqa":
        pairs, note = question_examples_or_reason(run, examples_dir)
        blocks = build_vqa_ui(classifier, pairs, note, show_paths=config.show_paths)
    else:
        examples, note = examples_or_reason(run, examples_dir)
        blocks = build_ui(classifier, examples, note, show_paths=config.show_paths)
    blocks.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)
    app = FastAPI(title="mmdeploy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimitMiddleware, upload_path=f"{API_PREFIX}/upload",
                       limits=config.limits)
    details = classifier.public_details(config.show_paths)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "run": details["run"], "adapter": details["adapter"],
                "task": classifier.task,
                "backend": classifier.backend, "classes": len(classifier.class_names),
                "concurrency": config.concurrency, "served": classifier.counters.snapshot()}

    return mount_page(app, blocks, config, examples_dir)


def mount_page(app: FastAPI, blocks: gr.Blocks, config: ServeConfig,
               examples_dir: Path) -> ServedApp:
    """Mount the Gradio page `blocks` at `/` of `app`, serving files from `examples_dir`
    and the uploads of clients only."""
    gr.mount_gradio_app(app, blocks, path="/", server_name=config.host,
                        server_port=config.port, max_file_size=config.limits.max_file_bytes,
                        allowed_paths=[str(examples_dir)], ssr_mode=False,
                        footer_links=["api"], run_history=False)
    # Gradio checks that a file named in a request was uploaded by a client (or is one of
    # the app's own examples) only once `has_launched` is set, which `launch()` does and
    # `mount_gradio_app` does not (`processing_utils._check_allowed`). Without it any server
    # path posted as the input is opened, hashed and copied into the cache for download.
    blocks.has_launched = True
    gradio_app = next(route.app for route in app.routes if isinstance(route, Mount))
    return ServedApp(app, gradio_app)


class _HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request
    head `HEADER_TIMEOUT_SECONDS` after it opened or after its last response. uvicorn has no
    such setting: its keep-alive timer starts only after a first response and any byte
    resets it, so a client that never finishes its headers would hold a connection forever.
    """

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request()

    def _expect_request(self) -> None:
        current = self.cycle  # a new request head replaces it

        def close_if_still_waiting() -> None:
            if self.cycle is current and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(HEADER_TIMEOUT_SECONDS, close_if_still_waiting)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the caller its address once it accepts connections (with
    `port=0`, the one the OS chose), and ending Gradio's streams when it shuts down."""

    def __init__(self, served: ServedApp, config: uvicorn.Config,
                 on_ready: Callable[[str], None]):
        super().__init__(config)
        self._served = served
        self._on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_ready(f"http://[{host}]:{port}/" if ":" in host else
                           f"http://{host}:{port}/")

    async def shutdown(self, sockets=None) -> None:
        self._served.end_streams()
        await super().shutdown(sockets)


@contextlib.contextmanager
def _private_gradio_cache():
    """A Gradio cache folder of this server's own (inside $GRADIO_TEMP_DIR if set), removed
    when it stops. Gradio's default cache is one folder per machine, its files named by
    content: a second server on the machine shares them, and deletes them all when it stops
    (the app's examples among them), so they must not be shared."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    with tempfile.TemporaryDirectory(prefix="mmdeploy-gradio-", dir=previous) as folder:
        os.environ["GRADIO_TEMP_DIR"] = folder
        try:
            yield
        finally:
            if previous is None:
                del os.environ["GRADIO_TEMP_DIR"]
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(classifier: Classifier, config: ServeConfig, listener: socket.socket,
          on_ready: Callable[[str], None]) -> None:
    """Serve `classifier`'s app (`build_app`) on `listener`: see `serve_app`."""
    serve_app(lambda examples_dir: build_app(classifier, config, examples_dir), config,
              listener, on_ready)


def serve_app(build: Callable[[Path], ServedApp], config: ServeConfig,
              listener: socket.socket, on_ready: Callable[[str], None]) -> None:
    """Serve the app `build(examples_dir)` makes on `listener` (from `listen.bind`) until
    SIGINT or SIGTERM, then shut down cleanly and return.

    uvicorn catches both signals, drains, and re-raises the signal to the handler that was
    installed before it; SIGTERM's is set to raise KeyboardInterrupt like SIGINT's, so both
    end here. Must run in the main thread (signal handlers can only be set there).
    """
    with tempfile.TemporaryDirectory(prefix="mmdeploy-examples-") as examples_dir, \
            _private_gradio_cache():
        served = build(Path(examples_dir))
        server = _Server(served, uvicorn.Config(
            served.app, log_level="warning", http=_HeadDeadline,
            limit_concurrency=config.max_connections,
            timeout_graceful_shutdown=config.graceful_seconds), on_ready)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=[listener])
        finally:
            signal.signal(signal.SIGTERM, previous)
            listener.close()
