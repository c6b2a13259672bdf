"""The Ray both scale-out commands run on (DESIGN section 9): a local one we start and stop,
or an existing cluster we join and leave as we found it.

We write no cluster code of our own: this only decides how to call `ray.init`. A local Ray
gets a bounded object store (Ray's default is 30% of RAM, too much beside the model and the
decode tasks on a small machine), no dashboard, and the CPUs Ray counts (the machine's,
within its container's limits); it is started with `address="local"`, so a cluster someone
started on this machine with `ray start` is never joined by accident. A cluster is joined
only when asked: `--ray-address` or the `RAY_ADDRESS` variable (Ray's own convention).
Leaving it stops the processes of a local Ray (and waits until they are gone, killing any
still up after a grace period) and only disconnects from a joined one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmdeploy.errors import ConfigError
from mmdeploy.images import Preprocessor

if TYPE_CHECKING:
    from mmdeploy.runtime.base import Predictor

INSTALL = "pip install 'mm-peft-deploy[ray]'"
OBJECT_STORE_MB = 768


def require_ray(feature: str, *modules: str) -> None:
    """Import Ray and the parts of it `feature` needs (`ray.data`, `ray.serve`), or say in
    one line which extra to install. Ray's parts import their own dependencies (pyarrow,
    fastapi), so a partial install fails here too, not halfway through a job."""
    for module in ("ray", *modules):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{feature} needs {exc.name or module}, which is not "
                              f"installed: {INSTALL}") from None


@dataclass(frozen=True)
class PredictorSpec:
    """The predictor the driver chose, as Ray's workers need it: they load their own from
    `run_path` and `backend` (a `Predictor` does not travel: its sessions and engines are not
    picklable). Made by loading the predictor once on the driver, so a broken run is one
    error line before any Ray process starts, and the device says whether a worker needs a
    GPU; that copy is dropped before the workers load theirs."""

    run_path: str
    backend: str
    precision: str
    description: str
    device: str
    preprocessor: Preprocessor
    task: str = "classification"  # the run's: a vqa run's inputs carry questions

    @classmethod
    def load(cls, run_path: str | os.PathLike, backend: str,
             precision: str = "fp32") -> PredictorSpec:
        from mmdeploy.runtime import load_predictor

        predictor = load_predictor(run_path, backend, precision)
        return cls(str(predictor.run_dir.root.resolve()), predictor.backend, precision,
                   f"{predictor.describe()}, precision {precision}", predictor.device,
                   predictor.preprocessor, predictor.task)

    def load_predictor(self, threads: int | None = None) -> Predictor:
        """The worker's own predictor (`threads`: see `runtime.load_predictor`)."""
        from mmdeploy.runtime import load_predictor

        return load_predictor(self.run_path, self.backend, self.precision, threads)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local Ray
    object_store_mb: int = OBJECT_STORE_MB  # a local Ray's object store


@dataclass(frozen=True)
class RaySession:
    """What the job runs on: the cluster's address, whether we started it, its CPUs, GPUs
    and nodes (to size the actor pool)."""

    address: str
    local: bool
    cpus: float
    gpus: float
    nodes: int

    def describe(self) -> str:
        where = "local Ray" if self.local else f"Ray cluster at {self.address}"
        return (f"{where}: {self.nodes} node{'s' * (self.nodes != 1)}, {self.cpus:g} CPUs, "
                f"{self.gpus:g} GPUs")


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[RaySession]:
    """Start or join Ray for the duration of the block (see the module docstring)."""
    import ray

    address = options.address or os.environ.get("RAY_ADDRESS") or None
    # Failures reach the driver as exceptions; the workers' own log lines stay in Ray's
    # session logs (/tmp/ray/session_latest/logs) instead of interleaving with ours.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    before = _descendants() if address is None else set()
    if address is None:
        context = ray.init(address="local", object_store_memory=options.object_store_mb * 2**20,
                           include_dashboard=False, **quiet)
    else:
        _check_reachable(address)
        try:
            context = ray.init(address=address, **quiet)
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address} ({exc})") from None
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        yield RaySession(context.address_info.get("gcs_address") or address or "local",
                         address is None, resources.get("CPU", 0.0),
                         resources.get("GPU", 0.0), nodes)
    finally:
        started = _descendants() - before if address is None else set()  # ours to reap
        ray.shutdown()
        _reap(started)


def _descendants() -> set:
    import psutil

    return set(psutil.Process().children(recursive=True))


def _reap(processes: set, grace: float = 10.0) -> None:
    """Wait for the processes of a local Ray to exit after `ray.shutdown()`, and kill those
    still up after `grace` s. `ray.shutdown()` stops the raylet and returns; its workers
    notice on their own, which on a loaded machine took over 15 s (seen in the suite), and
    a command must leave no process behind when it returns."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT nothing listens on in one line: Ray itself retries for minutes.
    (`ray://` client addresses and `auto` are left to Ray.)"""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        raise ConfigError(f"cannot join the Ray cluster at {address} ({reason})") from None


def gpus_per_worker(spec: PredictorSpec, session: RaySession, workers: int, kind: str) -> float:
    """One GPU per worker (actor or replica) on a GPU backend, none on a CPU one. A request
    the cluster cannot meet is refused here: Ray would wait for the GPUs forever."""
    if not spec.gpu:
        return 0.0
    if session.gpus < workers:
        raise ConfigError(f"{spec.backend} runs on a GPU, one per {kind}, but the Ray cluster "
                          f"has {session.gpus:g} GPUs for {workers} {kind}s")
    return 1.0
