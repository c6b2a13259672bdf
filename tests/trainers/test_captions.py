"""A captioned manifest through train (caption context), export and verify."""

import csv
import json

from PIL import Image

from mmdeploy.data import load_labeled


def test_caption_context_end_to_end(tmp_path, cli):
    demo = load_labeled("demo")
    rows = []
    for index, sample in enumerate(demo.samples[::250][:40]):
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(sample.image).save(path)
        name = demo.class_names[sample.label]
        caption = f"a {'large' if name in ('elephant', 'giraffe') else 'small'} animal"
        rows.append({"path": f"images/{index}.png", "label": name,
                     "caption": caption if index % 4 else ""})
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    assert min(counts.values()) >= 3

    run = tmp_path / "run"
    trained = cli(["train", "--adapter", "hmmoe", "--data", manifest, "--out", run,
                   "--shots", "1", "--val-per-class", "1", "--test-per-class", "1",
                   "--max-steps", "4", "--option", "context=captions"])
    assert trained.code == 0, str(trained)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["adapter_config"]["context"] == "captions"
    exported = cli(["export", "--run", run, "--batch-range", "1,2,8"])
    assert exported.code == 0, str(exported)
    assert cli(["verify", run]).code == 0
