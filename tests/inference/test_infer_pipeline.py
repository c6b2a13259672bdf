"""The batch-inference pipeline: bounded read-ahead, decode threads, --fail-fast, summary."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmdeploy.data import Sample
from mmdeploy.inference.batch import InferenceOptions, run_inference
from mmdeploy.runtime import load_predictor


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Recorder:
    """A stand-in for tqdm that notes, at every batch written, how far the listing was read."""

    def __init__(self, listing: Listing):
        self.listing, self.written, self.ahead = listing, 0, []

    def __call__(self, **kwargs) -> Recorder:
        return self

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def update(self, count: int) -> None:
        self.written += count
        self.ahead.append(self.listing.pulled - self.written)

    def set_postfix(self, **kwargs) -> None:
        pass


class Listing:
    """`count` inputs named apart, cycling over real image files; counts what was pulled."""

    def __init__(self, files: list[Path], count: int):
        self.files, self.count, self.pulled = files, count, 0

    def __iter__(self) -> Iterator[Sample]:
        for index in range(self.count):
            self.pulled += 1
            path = self.files[index % len(self.files)]
            yield Sample(f"{index:04d}-{path.name}", str(path))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_listing_is_read_lazily_and_at_most_a_bounded_queue_ahead(tiny_run, image_dir,
                                                                       tmp_path, workers):
    files = sorted(p for p in image_dir.rglob("*") if p.is_file())
    listing = Listing(files, 200)
    recorder = Recorder(listing)
    options = InferenceOptions(batch_size=8, workers=workers)
    summary = run_inference(load_predictor(tiny_run, "onnxruntime"), listing,
                            tmp_path / "rows.jsonl", options, progress=recorder)
    assert summary.written == recorder.written == 200 and summary.errors == 0
    assert [r["path"] for r in rows_of(tmp_path / "rows.jsonl")] == [
        f"{i:04d}-{files[i % len(files)].name}" for i in range(200)]
    depth = 2 * options.batch_size  # the pipeline's queue of images being decoded
    if workers == 0:
        assert set(recorder.ahead[:-1]) == {0}  # decoded inline: nothing read ahead
    else:
        assert max(recorder.ahead) <= depth
        assert max(recorder.ahead) >= options.batch_size  # threads decoded ahead


def test_workers_do_not_change_the_rows(cli, tiny_run, image_dir, tmp_path):
    outputs = []
    for workers in ("0", "3"):
        out = tmp_path / f"workers-{workers}.jsonl"
        result = cli(["infer", tiny_run, image_dir, "-o", out, "--workers", workers,
                      "--batch-size", "6"])
        assert result.code == 0, str(result)
        assert "img/s" in result.stderr  # the progress bar
        assert "images/s) -> " in result.stdout  # the summary's throughput
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_fail_fast_stops_at_the_first_bad_file_and_keeps_the_rows_before_it(
        cli, expect_error, tiny_run, image_dir, tmp_path):
    folder = Path(shutil.copytree(image_dir / "extra", tmp_path / "in"))
    (folder / "chz-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    names = sorted(p.name for p in folder.iterdir())
    bad_at = names.index("chz-broken.jpg")
    assert bad_at == 3  # the second row of the second batch: the first one is kept
    out = tmp_path / "rows.jsonl"

    line = expect_error(cli(["infer", tiny_run, folder, "-o", out, "--fail-fast",
                             "--batch-size", "2"]),
                        str(folder / "chz-broken.jpg"), "not an image", "--fail-fast")
    assert f"keeping the {bad_at} row(s) before it in {out}" in line
    rows = rows_of(out)
    assert [Path(r["path"]).name for r in rows] == names[:bad_at]
    assert all(r["error"] is None for r in rows)

    # without --fail-fast, resuming writes the bad file's error row and the rest
    result = cli(["infer", tiny_run, folder, "-o", out, "--resume"])
    assert result.code == 0, str(result)
    assert f"(1 errors, {bad_at} already done)" in result.stdout
    assert [Path(r["path"]).name for r in rows_of(out)] == names
