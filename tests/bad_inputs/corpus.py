"""A corpus of bad and unusual inputs for `mmdeploy infer`, each with its declared outcome.

Each case is one small function that writes its files into a fresh folder and returns what
to pass to `infer` and what must come out:

- `Predicted`: a valid but unusual image gets a prediction. With `reference`, the pixels it
  must decode to (computed here from the pixels the case wrote, not by the code under test);
  the test predicts a lossless PNG of them beside it and wants the same top-k. With
  `unlike`, the pixels a wrong decoder would give (EXIF ignored, alpha dropped, the second
  frame); the prediction must differ from theirs, which shows the reference has teeth.
- `Failed`: exactly one error row, whose message starts with the row's path and names the
  problem.
- `Built.cli_error`: the input is unusable as a whole: one `error: ...` line, exit 1, no
  output file.

Files are made at test time (a symlink loop, a FIFO or an unreadable file cannot live in
git), from a real photograph so that different pixels give visibly different predictions.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Predicted:
    reference: np.ndarray | None = None  # uint8 HxWx3 the input must decode to
    unlike: np.ndarray | None = None  # uint8 HxWx3 a wrong decoding would give


@dataclass(frozen=True)
class Failed:
    message: str  # a fragment of the error, after "<path>: "


@dataclass
class Built:
    inputs: list[str]  # the INPUTS arguments of `mmdeploy infer`
    rows: dict[str, Predicted | Failed] = field(default_factory=dict)  # by row `path`
    cli_error: list[str] | None = None  # fragments of the one error line


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Built]
    skip: str | None = None  # why this case cannot run here


CASES: list[Case] = []


def case(skip: str | None = None):
    def register(build: Callable[[Path], Built]) -> Callable[[Path], Built]:
        CASES.append(Case(build.__name__.replace("_", "-"), build, skip))
        return build

    return register


# ----------------------------------------------------------------------------- pixels


def photo(width: int = 72, height: int = 48) -> np.ndarray:
    """A real photograph (scikit-image's coffee cup), resized: uint8 HxWx3."""
    from skimage import data

    image = Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image).copy()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def decoded(data: bytes) -> np.ndarray:
    """PIL's plain decode to RGB, no orientation or alpha handling: what the file stores."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).copy()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def one_file(folder: Path, name: str, data: bytes, outcome: Predicted | Failed) -> Built:
    path = write(folder / name, data)
    return Built([path], {path: outcome})


# ----------------------------------------------------------------------------- undecodable


@case()
def corrupt_bytes(folder: Path) -> Built:
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return one_file(folder, "noise.jpg", noise, Failed("not an image"))


@case()
def corrupt_jpeg_scan(folder: Path) -> Built:
    """Valid JPEG headers, then a run of 0xFF bytes in the compressed scan."""
    data = bytearray(encode(Image.fromarray(photo(200, 150)), "JPEG", quality=95))
    data[len(data) // 3: len(data) // 3 + 200] = b"\xff" * 200
    return one_file(folder, "broken.jpg", bytes(data), Failed("cannot decode image"))


@case()
def truncated_jpeg(folder: Path) -> Built:
    data = encode(Image.fromarray(photo(200, 150)), "JPEG", quality=95)
    return one_file(folder, "cut.jpg", data[: len(data) // 2], Failed("truncated image"))


@case()
def truncated_png(folder: Path) -> Built:
    data = encode(Image.fromarray(photo(200, 150)), "PNG")
    return one_file(folder, "cut.png", data[: len(data) // 2], Failed("truncated image"))


@case()
def zero_bytes(folder: Path) -> Built:
    return one_file(folder, "empty.jpg", b"", Failed("empty file"))


@case()
def text_named_jpg(folder: Path) -> Built:
    data = b"a shopping list, not a photo\n"
    return one_file(folder, "list.jpg", data, Failed("not an image"))


@case()
def decompression_bomb(folder: Path) -> Built:
    return one_file(folder, "bomb.png", png_claiming(50_000, 50_000), Failed("pixels"))


@case()
def extreme_aspect_ratio(folder: Path) -> Built:
    """Decodes fine (100k pixels), but a shortest-edge resize would make it millions."""
    strip = Image.new("RGB", (1, 100_000), (90, 120, 30))
    return one_file(folder, "strip.png", encode(strip, "PNG"), Failed("too elongated"))


# ----------------------------------------------------------------------------- file system


@case()
def symlink_loop(folder: Path) -> Built:
    folder.mkdir(parents=True)
    os.symlink("loop.jpg", folder / "loop.jpg")
    return Built([str(folder)], {str(folder / "loop.jpg"): Failed("cannot read")})


@case()
def broken_symlink(folder: Path) -> Built:
    folder.mkdir(parents=True)
    os.symlink("gone.jpg", folder / "dangling.jpg")
    return Built([str(folder)], {str(folder / "dangling.jpg"): Failed("no such file")})


@case()
def fifo_named_jpg(folder: Path) -> Built:
    """Opening a FIFO would block forever; it must be refused without being opened."""
    folder.mkdir(parents=True)
    os.mkfifo(folder / "pipe.jpg")
    return Built([str(folder)], {str(folder / "pipe.jpg"): Failed("not a regular file")})


@case(skip="running as root, which reads any file whatever its mode" if os.geteuid() == 0
      else None)
def unreadable_file(folder: Path) -> Built:
    path = write(folder / "secret.png", encode(Image.fromarray(photo()), "PNG"))
    os.chmod(path, 0)
    return Built([path], {path: Failed("permission denied")})


@case()
def folder_named_like_an_image(folder: Path) -> Built:
    """A folder walk goes into `album.jpg/`; a manifest naming it gets an error row."""
    inner = write(folder / "album.jpg" / "inner.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", b"path\nalbum.jpg\n")
    return Built([str(folder / "album.jpg"), manifest],
                 {inner: Predicted(reference=photo()),
                  str(folder / "album.jpg"): Failed("is a directory")})


@case()
def non_utf8_file_name(folder: Path) -> Built:
    """A name that is not UTF-8 (Latin-1 'café') is shown with \\xNN, as `ls` does."""
    folder.mkdir(parents=True)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:
        handle.write(encode(Image.fromarray(photo()), "PNG"))
    return Built([str(folder)], {f"{folder}/caf\\xe9.png": Predicted(reference=photo())})


@case()
def newline_in_file_name(folder: Path) -> Built:
    """A row stays one line: the newline in the name is escaped."""
    write(folder / "two\nlines.png", encode(Image.fromarray(photo()), "PNG"))
    return Built([str(folder)], {f"{folder}/two\\x0alines.png": Predicted(reference=photo())})


# ----------------------------------------------------------------------------- manifests


@case()
def manifest_missing_columns(folder: Path) -> Built:
    write(folder / "a.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", b"file,label\na.png,cat\n")
    return Built([manifest], cli_error=[manifest, "missing required column 'path'",
                                        "file, label"])


@case()
def manifest_not_utf8(folder: Path) -> Built:
    write(folder / "café.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", "path\ncafé.png\n".encode("latin-1"))
    return Built([manifest], cli_error=[manifest, "not UTF-8 text at byte 8"])


@case()
def manifest_non_ascii_names(folder: Path) -> Built:
    names = ["café.png", "日本語 写真.jpg", "emoji 🐈.png"]
    for name in names:
        image = Image.fromarray(photo())
        write(folder / "img" / name, encode(image, "JPEG" if name.endswith("jpg") else "PNG"))
    manifest = write(folder / "list.jsonl",
                     "".join(json.dumps({"path": f"img/{n}"}) + "\n" for n in names).encode())
    return Built([manifest], {str(folder / "img" / n): Predicted() for n in names})


@case()
def manifest_missing_file(folder: Path) -> Built:
    present = write(folder / "here.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", b"path\nhere.png\nnot-here.png\n")
    return Built([manifest], {present: Predicted(reference=photo()),
                              str(folder / "not-here.png"): Failed("no such file")})


@case()
def manifest_empty_path(folder: Path) -> Built:
    present = write(folder / "here.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", b"path,label\nhere.png,cat\n,dog\n")
    return Built([manifest], {present: Predicted(reference=photo()),
                              f"{manifest}:3": Failed("'path' must be a non-empty string")})


@case()
def manifest_bad_json_line(folder: Path) -> Built:
    present = write(folder / "here.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.jsonl", b'{"path": "here.png"}\n{"path": "a.png"\n[1, 2]\n')
    return Built([manifest], {present: Predicted(reference=photo()),
                              f"{manifest}:2": Failed("bad JSON"),
                              f"{manifest}:3": Failed("expected a JSON object, got list")})


@case()
def manifest_nul_byte_in_path(folder: Path) -> Built:
    manifest = write(folder / "list.jsonl", b'{"path": "a\\u0000b.png"}\n')
    return Built([manifest], {f"{folder}/a\\x00b.png": Failed("not a valid file name")})


@case()
def manifest_lists_a_file_twice(folder: Path) -> Built:
    present = write(folder / "here.png", encode(Image.fromarray(photo()), "PNG"))
    manifest = write(folder / "list.csv", b"path\nhere.png\nhere.png\n")
    return Built([manifest], {present: Predicted(reference=photo())})


# ----------------------------------------------------------------------------- unusual images


@case()
def png_named_jpg(folder: Path) -> Built:
    data = encode(Image.fromarray(photo()), "PNG")
    return one_file(folder, "really-a-png.jpg", data, Predicted(reference=photo()))


@case()
def sixteen_bit_png(folder: Path) -> Built:
    wide = photo()[:, :, 1].astype(np.uint16) * 256 + 128  # 16-bit gray, low byte non-zero
    data = encode(Image.fromarray(wide), "PNG")
    eight = np.rint(wide / 257).astype(np.uint8)
    clipped = np.minimum(wide, 255).astype(np.uint8)  # what a naive conversion gives
    return one_file(folder, "deep.png", data,
                    Predicted(reference=np.repeat(eight[:, :, None], 3, axis=2),
                              unlike=np.repeat(clipped[:, :, None], 3, axis=2)))


@case()
def cmyk_jpeg(folder: Path) -> Built:
    data = encode(Image.fromarray(photo()).convert("CMYK"), "JPEG", quality=95)
    return one_file(folder, "print.jpg", data, Predicted())


@case()
def animated_gif(folder: Path) -> Built:
    """Two frames on one exact palette: the first frame's pixels are known exactly."""
    first, second = photo(), photo()[::-1, ::-1].copy()
    palette = Image.fromarray(first).quantize(16)
    frames = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE)
              for f in (first, second)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                  loop=0, disposal=1)
    return one_file(folder, "moving.gif", data,
                    Predicted(reference=np.asarray(frames[0].convert("RGB")),
                              unlike=np.asarray(frames[1].convert("RGB"))))


@case()
def palette_png_with_transparency(folder: Path) -> Built:
    """Palette index 0 is black and transparent: it must show as white, not black."""
    indices = (photo()[:, :, 0] // 64).astype(np.uint8)  # 0..3
    image = Image.fromarray(indices, "P")
    colours = [(0, 0, 0), (200, 40, 40), (40, 200, 40), (40, 40, 200)]
    image.putpalette([c for colour in colours for c in colour])
    data = encode(image, "PNG", transparency=0)
    rgb = np.array(colours, dtype=np.uint8)[indices]
    white = np.where(indices[:, :, None] == 0, np.uint8(255), rgb)
    return one_file(folder, "sticker.png", data, Predicted(reference=white, unlike=rgb))


@case()
def rgba_png(folder: Path) -> Built:
    pixels = photo()
    alpha = np.where(np.arange(pixels.shape[1])[None, :] < 36, 0, 255).astype(np.uint8)
    alpha = np.broadcast_to(alpha, pixels.shape[:2])
    data = encode(Image.fromarray(np.dstack([pixels, alpha])), "PNG")
    white = np.where(alpha[:, :, None] == 0, np.uint8(255), pixels)
    return one_file(folder, "cutout.png", data, Predicted(reference=white, unlike=pixels))


@case()
def exif_rotated_jpeg(folder: Path) -> Built:
    """Stored landscape with EXIF orientation 6: shown rotated 90 degrees clockwise."""
    image = Image.fromarray(photo())
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    stored = decoded(data)
    return one_file(folder, "phone.jpg", data,
                    Predicted(reference=np.rot90(stored, k=-1).copy(), unlike=stored))


@case()
def grayscale_jpeg(folder: Path) -> Built:
    data = encode(Image.fromarray(photo()).convert("L"), "JPEG", quality=95)
    return one_file(folder, "gray.jpg", data, Predicted(reference=decoded(data)))


@case()
def one_pixel(folder: Path) -> Built:
    dot = np.full((1, 1, 3), (200, 120, 40), dtype=np.uint8)
    return one_file(folder, "dot.png", encode(Image.fromarray(dot), "PNG"),
                    Predicted(reference=dot))
