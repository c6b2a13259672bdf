"""A small generated vqa set: one coloured shape per image, template questions about it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
IMAGES_PER_KIND = 5


def questions_about(colour: str, shape: str) -> list[tuple[str, str]]:
    return [("what color is the shape?", colour), ("what is the shape?", shape),
            ("is there a red shape?", "yes" if colour == "red" else "no"),
            ("does the image contain a circle?", "yes" if shape == "circle" else "no")]


def write_vqa_set(folder: Path) -> Path:
    """30 images (3 colours x 2 shapes x 5 positions) and their `path,question,answer`
    manifest, 4 questions per image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for index in range(IMAGES_PER_KIND):
                image = Image.new("RGB", (64, 64), (255, 255, 255))
                draw = ImageDraw.Draw(image)
                x, y = rng.integers(4, 28, size=2)
                box = (int(x), int(y), int(x) + 30, int(y) + 30)
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
                name = f"{colour}-{shape}-{index}.png"
                image.save(folder / name)
                rows += [(name, q, a) for q, a in questions_about(colour, shape)]
    manifest = folder / "vqa.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "question", "answer"])
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="session")
def vqa_manifest(tmp_path_factory) -> Path:
    return write_vqa_set(tmp_path_factory.mktemp("vqa"))
