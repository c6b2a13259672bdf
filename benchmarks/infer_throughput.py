"""Batch-inference throughput of `mmdeploy infer` with decoding in worker threads vs inline.

    python benchmarks/infer_throughput.py runs/hmmoe-demo --workers 0,2 --repeats 3

Writes a folder of real images once (the bundled set's held-out images at their native
size, and larger JPEG photographs from scikit-image, where decoding dominates), then runs
`mmdeploy infer` on it as a fresh process per measurement, alternating the settings so that
each sees the same machine conditions. Throughput is the images/s the command reports: the
pipeline alone (listing, decoding, preprocessing, prediction, writing), without start-up and
model loading. Writes benchmarks/results/<date>-<host>-infer_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from report import write_report

from mmdeploy.inference.demo_images import write_demo_images

SIZES = [(1024, 768), (800, 600), (1280, 960), (640, 480)]


def write_images(root: Path, small: int, photos: int) -> int:
    from skimage import data

    count = len(write_demo_images(root / "demo", count=small))
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
               data.hubble_deep_field(), data.immunohistochemistry(), data.retina()]
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for index in range(photos):
        image = Image.fromarray(sources[index % len(sources)])
        image = image.resize(SIZES[index % len(SIZES)], Image.Resampling.BILINEAR)
        image.save(root / "photos" / f"{index:04d}.jpg", quality=90)
    return count + photos


def measure(run: str, images: Path, workers: int, backend: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "mmdeploy", "infer", run, str(images), "-o", str(out),
             "--backend", backend, "--workers", str(workers)],
            capture_output=True, text=True, check=True)
    return float(re.search(r"\(([\d.]+) images/s\)", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--workers", default="0,2", help="comma-separated settings to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=400, help="demo images (28-76 px)")
    parser.add_argument("--photos", type=int, default=200, help="JPEGs of 640x480-1280x960")
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args()

    settings = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()
    results: dict[int, list[float]] = {w: [] for w in settings}
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder)
        total = write_images(images, args.small, args.photos)
        for _ in range(args.repeats):
            for workers in settings:
                results[workers].append(measure(args.run, images, workers, args.backend))
                print(f"workers={workers}: {results[workers][-1]:.1f} images/s", flush=True)

    report = {
        "images": total, "backend": args.backend, "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "python": platform.python_version(),
        "images_per_second": {str(w): {"runs": r, "median": statistics.median(r)}
                              for w, r in results.items()},
    }
    print(json.dumps(report["images_per_second"]))
    write_report("infer_throughput", report)


if __name__ == "__main__":
    main()
