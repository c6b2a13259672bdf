"""Write some of the bundled set's held-out images as real files, for `infer` to read.

PNG and JPEG, grayscale and colour, at several sizes: what a user's folder looks like.
`python -m mmdeploy.inference.demo_images OUT [--count N]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from mmdeploy.config import DataConfig


def write_demo_images(out: Path, count: int = 40) -> list[Path]:
    splits = DataConfig(source="demo").splits()
    step = max(1, len(splits.test) // count)
    written = []
    for index, sample in enumerate(splits.test[::step][:count]):
        image = Image.fromarray(sample.image)
        size = 28 + 12 * (index % 5)
        image = image.resize((size, size + 4 * (index % 3)), Image.Resampling.BICUBIC)
        if index % 2:
            image = image.convert("RGB")
        folder = out / splits.class_names[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:03d}.{'jpg' if index % 3 == 0 else 'png'}"
        image.save(path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    paths = write_demo_images(args.out, args.count)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
