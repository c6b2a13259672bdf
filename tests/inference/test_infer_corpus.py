"""Every case of the bad-input corpus (`tests/bad_inputs/corpus.py`) through `mmdeploy infer`
on the session's tiny run: the outcome declared beside the case, and never a traceback.

A valid but unusual image must predict exactly what a plain PNG of its expected pixels
predicts (same top-k), and differ from what a wrong decoding would predict; a bad file is
one error row naming it; an unusable manifest is one `error: ...` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bad_inputs.corpus import CASES, Built, Failed, Predicted
from PIL import Image

CORPUS = [pytest.param(c, id=c.name, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
          for c in CASES]
ALL_CLASSES = "1000"  # --top-k larger than the class count: rows carry every probability


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


def write_png(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def probabilities(row: dict) -> dict[str, float]:
    return dict(row["topk"])


def check_prediction(row: dict, classes: list[str]) -> None:
    assert row["error"] is None, row
    assert row["label"] in classes and row["topk"][0] == [row["label"], row["score"]], row
    probs = [p for _, p in row["topk"]]
    assert sorted(probs, reverse=True) == probs and all(0.0 <= p <= 1.0 for p in probs)
    assert sorted(label for label, _ in row["topk"]) == sorted(classes)
    assert abs(sum(probs) - 1.0) <= 1e-4


def test_the_corpus_has_at_least_twenty_distinct_cases_of_every_outcome(tmp_path):
    names = [c.name for c in CASES]
    assert len(names) >= 20 and len(set(names)) == len(names)
    built = [c.build(tmp_path / c.name) for c in CASES if not c.skip]
    outcomes = [type(o).__name__ for b in built for o in b.rows.values()]
    assert outcomes.count("Predicted") >= 10 and outcomes.count("Failed") >= 10
    assert sum(b.cli_error is not None for b in built) >= 2


@pytest.mark.parametrize("case", CORPUS)
def test_bad_input(case, cli, expect_error, tiny_run, tmp_path):
    built: Built = case.build(tmp_path / "case")
    out = tmp_path / "rows.jsonl"
    if built.cli_error is not None:
        expect_error(cli(["infer", tiny_run, *built.inputs, "-o", out]), *built.cli_error)
        assert not out.exists()
        return

    # plain PNGs of the pixels each unusual image must (and must not) decode to
    references, unlike = {}, {}
    for number, (path, expected) in enumerate(built.rows.items()):
        if isinstance(expected, Predicted) and expected.reference is not None:
            references[path] = write_png(tmp_path / "ref" / f"{number}.png", expected.reference)
        if isinstance(expected, Predicted) and expected.unlike is not None:
            unlike[path] = write_png(tmp_path / "ref" / f"{number}-unlike.png", expected.unlike)
    extra = [str(tmp_path / "ref")] if references or unlike else []

    result = cli(["infer", tiny_run, *built.inputs, *extra, "-o", out, "--top-k", ALL_CLASSES,
                  "--workers", "2"])
    assert result.code == 0, str(result)
    assert "Traceback" not in result.output
    rows = read_rows(out)
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "one row per input"
    assert set(by_path) == {*built.rows, *references.values(), *unlike.values()}
    errors = sum(row["error"] is not None for row in rows)
    assert f"{len(rows)} rows written ({errors} errors, 0 already done" in result.stdout

    classes = json.loads((tiny_run / "adapter_config.json").read_text())["class_names"]
    for path, expected in built.rows.items():
        row = by_path[path]
        if isinstance(expected, Failed):
            assert row["error"].startswith(f"{path}: "), row
            assert expected.message in row["error"], row
            assert "\n" not in row["error"]
            assert row["label"] is None and row["score"] is None and row["topk"] == []
            continue
        check_prediction(row, classes)
        if path in references:
            same = by_path[references[path]]
            assert row["label"] == same["label"], (row, same)
            got, want = probabilities(row), probabilities(same)
            assert max(abs(got[c] - want[c]) for c in classes) <= 1e-5, (row, same)
        if path in unlike:
            got, wrong = probabilities(row), probabilities(by_path[unlike[path]])
            assert sum(abs(got[c] - wrong[c]) for c in classes) > 1e-3, "wrong decoding " \
                "predicts the same: the reference cannot tell"
