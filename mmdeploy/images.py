"""Image decoding and the one preprocessing shared by training and every runtime backend.

`load_image` turns whatever a user hands us (a path, raw bytes, a uint8 array, a PIL image)
into a fully decoded 8-bit RGB image or raises `InputError` with one line naming the input.
`Preprocessor` wraps the checkpoint's own `transformers` image processor, always on its PIL
backend, so that training, export parity and serving see bit-identical pixels.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, InputError
from .interface import INPUT_NAME

MAX_IMAGE_PIXELS = 40_000_000
"""Largest width x height we decode; bigger images are refused (decompression-bomb guard)."""

ImageSource = str | os.PathLike | bytes | np.ndarray | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode `source` into an 8-bit RGB image with its EXIF orientation applied.

    `name` is what error messages call the input (default: the path, `<bytes>`, `<array>`
    or `<image>`). Animated images give their first frame; transparency is composited onto
    white, as `transformers` does.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), name or os.fspath(source))
    if isinstance(source, (bytes, bytearray)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise InputError(f"{label}: empty file")
        return _decode(io.BytesIO(source), label)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>")
    if isinstance(source, Image.Image):
        return _finish(source, name or "<image>")
    raise TypeError(
        f"load_image expects a path, bytes, a numpy array or a PIL image, "
        f"got {type(source).__name__}"
    )


def _load_path(path: Path, label: str) -> Image.Image:
    """Check the file with `stat` before decoding so that each I/O failure gets its own reason."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL byte or a lone surrogate: no file can have that name
        raise InputError(f"{label}: not a valid file name ({exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise InputError(f"{label}: not a regular file")
    if info.st_size == 0:
        raise InputError(f"{label}: empty file")
    try:
        handle = path.open("rb")
    except PermissionError:
        raise InputError(f"{label}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    with handle:
        return _decode(handle, label)


def _decode(stream: io.BufferedIOBase, label: str) -> Image.Image:
    """Open and fully decode an encoded image, translating every PIL failure to `InputError`."""
    try:
        # Scoped, not global: PIL warns (instead of raising) between 1x and 2x its own limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                return _finish(image, label)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{label}: too many pixels (limit {MAX_IMAGE_PIXELS})") from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image (cannot identify image file)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise InputError(f"{label}: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return "truncated image"
    return f"cannot decode image ({message})"


def _check_size(image: Image.Image, label: str) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{label}: {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}"
        )
    if width == 0 or height == 0:
        raise InputError(f"{label}: image has no pixels ({width}x{height})")


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    valid_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not valid_shape:
        raise InputError(
            f"{label}: expected a uint8 HxW, HxWx3 or HxWx4 array, "
            f"got {array.dtype} {tuple(array.shape)}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return _finish(Image.fromarray(np.ascontiguousarray(array)), label)


def _finish(image: Image.Image, label: str) -> Image.Image:
    """Load pixel data, apply EXIF orientation and convert to a new 8-bit RGB image."""
    try:
        _check_size(image, label)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{label}: {_describe(exc)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_sixteen_to_eight_bit(np.asarray(image)))
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_to_eight_bit(wide: np.ndarray) -> np.ndarray:
    """Rescale 0..65535 to 0..255, rounding to nearest (PIL's own conversion clips at 255).

    Integer arithmetic, a band of rows at a time, so a 40-megapixel image needs its 8-bit
    result and small temporaries, not float64 copies of 320 MB: with x = 257 q + r,
    round(x / 257) is q + (r >= 129) (257 is odd, so no x falls halfway).
    """
    out = np.empty(wide.shape, dtype=np.uint8)
    for top in range(0, len(wide), _BAND_ROWS):
        band = wide[top:top + _BAND_ROWS]
        if band.dtype != np.uint16:  # mode "I" is int32, "I;16B" big-endian
            band = np.clip(band, 0, 65535).astype(np.uint16)
        quotient = band // 257
        quotient += (band - quotient * 257) >= 129
        out[top:top + _BAND_ROWS] = quotient
    return out


_BAND_ROWS = 256


def image_pixels(source: ImageSource) -> int:
    """width x height from the image's header without decoding it, for bytes or a regular
    file; 0 when it cannot be read that way (decoding then says why)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            if not stat.S_ISREG(os.stat(source).st_mode):
                return 0
            opened = Image.open(source)
        elif isinstance(source, (bytes, bytearray)):
            opened = Image.open(io.BytesIO(source))
        else:
            return 0
        with opened as image:
            return image.width * image.height
    except Exception:  # whatever stops the header being read stops decoding too, with a reason
        return 0


class Preprocessor:
    """The checkpoint's `transformers` image processor, forced onto its PIL backend.

    The PIL backend is chosen explicitly (`backend="pil"`): it needs no torchvision, logs no
    fallback warning, and gives the same pixels on a CPU box and on a GPU box that happens
    to have torchvision installed.
    """

    def __init__(self, processor: Any):
        self._processor = processor
        self._size = _output_size(processor)
        resizes = getattr(processor, "do_resize", False)
        self._shortest_edge = _get(processor.size, "shortest_edge") if resizes else None

    def settings(self) -> dict:
        """The image processor's settings (what makes its pixels), as JSON values."""
        return self._processor.to_dict()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Preprocessor:
        """Load `preprocessor_config.json` from a local checkpoint directory."""
        from transformers import AutoImageProcessor

        config = Path(path) / "preprocessor_config.json"
        if not config.is_file():
            raise ConfigError(f"{path}: no preprocessor_config.json")
        try:
            processor = AutoImageProcessor.from_pretrained(
                os.fspath(path), backend="pil", local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{config}: cannot build an image processor ({exc})") from None
        return cls(processor)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Preprocessor:
        """Rebuild from `to_dict()` output, e.g. the copy recorded in a run's config."""
        with tempfile.TemporaryDirectory(prefix="mmdeploy-preproc-") as folder:
            Path(folder, "preprocessor_config.json").write_text(json.dumps(config))
            return cls.from_pretrained(folder)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every output image."""
        return self._size

    def to_dict(self) -> dict[str, Any]:
        """The processor's configuration as plain JSON types."""
        return json.loads(self._processor.to_json_string())

    def check(self, image: Image.Image, name: str) -> None:
        """Refuse an image whose resized intermediate would exceed `MAX_IMAGE_PIXELS`.

        A shortest-edge resize scales the long side by the same factor before the crop, so a
        thin strip within the decode limit (1 x 40M) would grow to billions of pixels.
        """
        if not self._shortest_edge:
            return
        width, height = image.size
        short, long = sorted((width, height))
        edge = int(self._shortest_edge)
        resized = edge * int(edge * long / short)  # as transformers computes the new size
        if resized > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{name}: {width}x{height} is too elongated: resizing its short side to {edge} "
                f"would make {resized} pixels (limit {MAX_IMAGE_PIXELS})"
            )

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Preprocess RGB images into a contiguous float32 array [B, 3, H, W]."""
        if not images:
            return np.zeros((0, 3, *self._size), dtype=np.float32)
        for number, image in enumerate(images, start=1):
            self.check(image, f"image {number}")
        pixels = self._processor(images=list(images), return_tensors="np")[INPUT_NAME]
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Preprocessor({type(self._processor).__name__}, image_size={self._size})"


def _output_size(processor: Any) -> tuple[int, int]:
    """The fixed (H, W) a processor produces; a size that depends on the input is refused."""
    candidates = []
    if getattr(processor, "do_center_crop", False):
        candidates.append(processor.crop_size)
    if getattr(processor, "do_resize", False):
        candidates.append(processor.size)
    for size in candidates:
        height, width = _get(size, "height"), _get(size, "width")
        if height and width:
            return int(height), int(width)
    raise ConfigError(
        f"{type(processor).__name__}: output size depends on the input image "
        "(needs a center crop or a fixed height and width)"
    )


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
