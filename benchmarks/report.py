"""Where a benchmark's figures go: benchmarks/results/<date>-<host>-<kind>.json."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path


def write_report(kind: str, report: dict) -> Path:
    """Write `report` as indented JSON and say where."""
    name = f"{datetime.date.today()}-{platform.node()}-{kind}.json"
    path = Path(__file__).parent / "results" / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {path}")
    return path
