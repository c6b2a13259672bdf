"""Latency of a running `mmdeploy serve` app under N concurrent clients, over HTTP.

    mmdeploy serve runs/hmmoe-demo --port 7860 &
    python benchmarks/app_latency.py http://127.0.0.1:7860/ runs/hmmoe-demo/demo-images \\
        --clients 32 --rounds 3

Each client is its own `gradio_client.Client` in its own thread; in every round all clients
send one single-image request at once (upload, queue, predict, result) and the wall time of
each is recorded. Also times requests one at a time (no contention) for comparison. Writes
benchmarks/results/<date>-<host>-app_latency.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from gradio_client import Client, handle_file

API = "/classify"


def timed_request(client: Client, image: Path) -> float:
    started = time.perf_counter()
    client.predict([handle_file(image)], api_name=API)
    return (time.perf_counter() - started) * 1e3


def percentiles(values: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(values, n=10)
    return {"p50_ms": round(statistics.median(values), 1), "p90_ms": round(deciles[8], 1),
            "max_ms": round(max(values), 1), "requests": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("images", type=Path, help="a folder of images to send")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    images = sorted(p for p in args.images.rglob("*") if p.is_file())
    clients = [Client(args.url, verbose=False, analytics_enabled=False, download_files=False)
               for _ in range(args.clients)]
    timed_request(clients[0], images[0])  # warm-up
    alone = [timed_request(clients[0], images[i % len(images)]) for i in range(args.clients)]
    together: list[float] = []
    with ThreadPoolExecutor(args.clients) as pool:
        for round_ in range(args.rounds):
            batch = [images[(round_ * args.clients + i) % len(images)]
                     for i in range(args.clients)]
            together += pool.map(timed_request, clients, batch)
    health = httpx.get(args.url.rstrip("/") + "/health", timeout=10).json()
    result = {"url": args.url, "backend": health["backend"], "run": health["run"],
              "concurrency": health["concurrency"], "clients": args.clients,
              "sequential": percentiles(alone), "concurrent": percentiles(together),
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"{stamp}-{platform.node()}-app_latency.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
