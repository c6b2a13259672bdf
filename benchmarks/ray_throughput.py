"""Batch inference on Ray vs local, and Ray Serve latency, for one run, in one go.

    python benchmarks/ray_throughput.py runs/hmmoe-demo --actors 1,2 --clients 8

Writes a folder of real images once (`infer_throughput.write_images`: the bundled set's
held-out images and large JPEG photographs), then runs, each as a fresh `mmdeploy` process
on that folder: `infer` (local engine) and `infer --engine ray --actors N` for each N.
Reported per run: the images/s the command prints (its pipeline, without process start-up
and model loading; for Ray that includes starting the actors, not `ray.init`), the wall
time of the whole command, when the first row reached the output file and the rows/s from
then on (the output is sampled every 0.25 s), and the peak memory of the command and every
process it started (PSS, so pages shared between Ray's processes count once).

Then `serve --engine ray --replicas R` on a free port: after a warm-up, `--clients` threads
each send `--requests` single-image POST /predict requests back to back; p50/p95 latency and
requests/s over all of them. Writes benchmarks/results/<date>-<host>-ray_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from infer_throughput import write_images
from report import write_report


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of `root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
    return total


class Command:
    """`python -m mmdeploy ARGS`, its wall time and the peak PSS of its process tree; with
    `rows`, also when each line of that output file appeared (sampled with the PSS)."""

    def __init__(self, args: list[str], rows: Path | None = None):
        self.rows = rows
        self.row_times: list[tuple[float, int]] = []  # (seconds since start, lines written)
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "mmdeploy", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.peak = 0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.process.poll() is None:
            self.peak = max(self.peak, tree_pss_bytes(self.process.pid))
            if self.rows is not None and self.rows.exists():
                with open(self.rows, "rb") as handle:
                    lines = sum(1 for _ in handle)
                self.row_times.append((time.perf_counter() - self.started, lines))
            time.sleep(0.25)

    def row_rates(self) -> dict:
        """When the first row appeared, and rows/s from then to the last one (what start-up
        costs, and the pipeline's rate once it runs)."""
        written = [(t, n) for t, n in self.row_times if n > 0]
        if len(written) < 2 or written[-1][0] == written[0][0]:
            return {}
        (first, rows_then), (last, total) = written[0], max(written, key=lambda s: s[1])
        return {"first_row_seconds": round(first, 1),
                "rows_per_second_after_first_row": round((total - rows_then) / (last - first),
                                                         2)}

    def finish(self) -> tuple[str, str, float]:
        out, err = self.process.communicate()
        seconds = time.perf_counter() - self.started
        self._sampler.join()
        if self.process.returncode:
            raise SystemExit(f"mmdeploy failed ({self.process.returncode}):\n{err}")
        return out, err, seconds


def measure_infer(run: str, images: Path, backend: str, batch_size: int,
                  actors: int | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        args = ["infer", run, str(images), "-o", str(Path(folder) / "rows.jsonl"),
                "--backend", backend, "--batch-size", str(batch_size)]
        if actors is not None:
            args += ["--engine", "ray", "--actors", str(actors)]
        command = Command(args, rows=Path(folder) / "rows.jsonl")
        out, _, seconds = command.finish()
    rate = float(re.search(r"\(([\d.]+) images/s\)", out).group(1))
    return {"images_per_second": rate, "wall_seconds": round(seconds, 1),
            "peak_pss_gib": round(command.peak / 2**30, 2), **command.row_rates()}


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=20)
    return {"p50_ms": round(statistics.median(values), 1), "p95_ms": round(cuts[18], 1),
            "max_ms": round(max(values), 1), "requests": len(values)}


def measure_serve(run: str, images: list[Path], backend: str, replicas: int, clients: int,
                  requests: int) -> dict:
    command = Command(["serve", run, "--engine", "ray", "--replicas", str(replicas),
                       "--port", "0", "--concurrency", str(clients), "--backend", backend])
    line = command.process.stdout.readline()  # "serving RUN (...) at URL (Ctrl+C to stop)"
    found = re.search(r" at (http://\S+)", line)
    if not found:
        command.process.kill()
        raise SystemExit(f"mmdeploy serve did not start: {line}{command.process.stderr.read()}")
    url = found.group(1) + "predict"
    bodies = [(p.name, p.read_bytes()) for p in images]

    def client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=60) as session:
            for number in range(requests):
                name, data = bodies[(index * requests + number) % len(bodies)]
                started = time.perf_counter()
                session.post(url, files=[("files", (name, data))]).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1e3)
        return latencies

    client(0)  # warm-up: every replica's first batch
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [ms for result in pool.map(client, range(clients)) for ms in result]
    seconds = time.perf_counter() - started
    command.process.send_signal(signal.SIGTERM)
    command.finish()
    return {"replicas": replicas, "clients": clients, **percentiles(latencies),
            "requests_per_second": round(len(latencies) / seconds, 1),
            "peak_pss_gib": round(command.peak / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--actors", default="1,2", help="comma-separated Ray pool sizes")
    parser.add_argument("--small", type=int, default=400, help="demo images (28-76 px)")
    parser.add_argument("--photos", type=int, default=200, help="JPEGs of 640x480-1280x960")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder)
        total = write_images(images, args.small, args.photos)
        infer = {"local": measure_infer(args.run, images, args.backend, args.batch_size, None)}
        print(f"local: {infer['local']}", flush=True)
        for actors in (int(a) for a in args.actors.split(",")):
            infer[f"ray-{actors}"] = measure_infer(args.run, images, args.backend,
                                                   args.batch_size, actors)
            print(f"ray, {actors} actor(s): {infer[f'ray-{actors}']}", flush=True)
        files = sorted((images / "photos").iterdir())
        serve = measure_serve(args.run, files, args.backend, args.replicas, args.clients,
                              args.requests)
        print(f"serve: {serve}", flush=True)

    report = {
        "run": args.run, "images": total, "backend": args.backend,
        "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "python": platform.python_version(), "infer": infer, "serve": serve,
    }
    write_report("ray_throughput", report)


if __name__ == "__main__":
    main()
