"""Decoding (`load_image`) and the shared preprocessing (`Preprocessor`)."""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import BitImageProcessorPil, CLIPImageProcessorPil

from mmdeploy import images
from mmdeploy.errors import ConfigError, InputError
from mmdeploy.images import Preprocessor, load_image


def _pixels(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path, image: Image.Image, fmt: str | None = None, **options):
    image.save(path, fmt, **options)
    return path


def _assert_rgb(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.mode == "RGB"
    assert image.size == size


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("suffix", ["png", "jpg", "bmp", "webp", "tiff"])
def test_common_formats_decode_to_rgb(tmp_path, suffix):
    path = _save(tmp_path / f"a.{suffix}", Image.fromarray(_pixels()))
    _assert_rgb(load_image(path), (40, 24))
    _assert_rgb(load_image(str(path)), (40, 24))


def test_png_is_lossless(tmp_path):
    pixels = _pixels()
    path = _save(tmp_path / "a.png", Image.fromarray(pixels))
    np.testing.assert_array_equal(np.asarray(load_image(path)), pixels)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = _pixels()[:, :, 0]
    image = load_image(_save(tmp_path / "g.png", Image.fromarray(gray, "L")))
    _assert_rgb(image, (40, 24))
    np.testing.assert_array_equal(np.asarray(image), np.repeat(gray[:, :, None], 3, axis=2))


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    image = np.asarray(load_image(_save(tmp_path / "t.png", Image.fromarray(rgba, "RGBA"))))
    assert image[0, 0].tolist() == [200, 0, 0]
    assert image[1, 1].tolist() == [255, 255, 255]


def test_gray_with_alpha(tmp_path):
    la = Image.merge("LA", [Image.new("L", (5, 3), 10), Image.new("L", (5, 3), 255)])
    image = load_image(_save(tmp_path / "la.png", la))
    _assert_rgb(image, (5, 3))
    assert np.asarray(image)[0, 0].tolist() == [10, 10, 10]


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.fromarray(_pixels()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    _assert_rgb(load_image(_save(tmp_path / "p.png", palette)), (40, 24))
    _assert_rgb(load_image(_save(tmp_path / "p.gif", palette, transparency=0)), (40, 24))


def test_sixteen_bit_gray_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_image(path)
    _assert_rgb(image, (3, 1))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(_save(tmp_path / "c.jpg", cmyk))
    _assert_rgb(image, (30, 20))
    red, green, blue = np.asarray(image)[10, 15].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path / "r.jpg", Image.fromarray(_pixels(20, 50)), exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (50, 20)
    _assert_rgb(load_image(path), (20, 50))


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("P", (8, 6), i) for i in (1, 2, 3)]
    for i, frame in enumerate(frames):
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        frames[i] = frame
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_bytes_arrays_and_pil_images():
    buffer = io.BytesIO()
    Image.fromarray(_pixels()).save(buffer, "PNG")
    _assert_rgb(load_image(buffer.getvalue()), (40, 24))
    _assert_rgb(load_image(_pixels()), (40, 24))
    _assert_rgb(load_image(_pixels()[:, :, 0]), (40, 24))
    _assert_rgb(load_image(np.zeros((24, 40, 4), np.uint8)), (40, 24))
    _assert_rgb(load_image(np.zeros((24, 40, 1), np.uint8)), (40, 24))
    _assert_rgb(load_image(Image.new("L", (7, 9))), (7, 9))


def test_result_does_not_keep_the_file_open(tmp_path):
    path = _save(tmp_path / "a.png", Image.fromarray(_pixels()))
    image = load_image(path)
    path.unlink()
    assert np.asarray(image).shape == (24, 40, 3)


# --------------------------------------------------------------------------- failures


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims the given size (PIL reads the size without decoding)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def _error(source, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_not_an_image(tmp_path):
    path = tmp_path / "cat.png"
    path.write_text("hello, I am text")
    assert _error(path) == f"{path}: not an image (cannot identify image file)"


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _error(path) == f"{path}: empty file"
    assert _error(b"") == "<bytes>: empty file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(_pixels(64, 64)).save(buffer, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert _error(path) == f"{path}: truncated image"


@pytest.mark.parametrize("side", [7_000, 10_000, 30_000])  # ours, PIL's warning, PIL's error
def test_too_many_pixels(tmp_path, side):
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(side, side))
    message = _error(path)
    assert message.startswith(f"{path}: ")
    assert "pixels" in message and str(images.MAX_IMAGE_PIXELS) in message


def test_pixel_limit_applies_to_arrays_and_pil_images(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    assert "11x10 pixels exceeds the limit of 100" in _error(np.zeros((10, 11), np.uint8))
    assert _error(Image.new("RGB", (20, 20)), name="up.png").startswith("up.png: 20x20")


def test_missing_file_and_directory(tmp_path):
    assert _error(tmp_path / "nope.png") == f"{tmp_path / 'nope.png'}: no such file"
    assert "is a directory" in _error(tmp_path)


def test_permission_denied(tmp_path, monkeypatch):
    path = _save(tmp_path / "secret.png", Image.fromarray(_pixels()))

    def refuse(*args, **kwargs):  # chmod 0 would not stop root, so refuse the open itself
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    assert _error(path) == f"{path}: permission denied"


def test_bad_arrays_and_custom_name():
    assert "float32" in _error(np.zeros((4, 4), np.float32))
    assert "(4, 4, 2)" in _error(np.zeros((4, 4, 2), np.uint8))
    assert _error(b"junk", name="upload-1").startswith("upload-1: not an image")


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture
def clip_dir(tmp_path):
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def _batch() -> list[Image.Image]:
    return [load_image(_pixels(24, 40, 1)), load_image(_pixels(90, 50, 2)), load_image(_pixels())]


def test_preprocessor_shape_dtype_and_size(clip_dir):
    preprocess = Preprocessor.from_pretrained(clip_dir)
    pixels = preprocess(_batch())
    assert pixels.shape == (3, 3, 32, 32)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert preprocess.image_size == (32, 32)
    assert preprocess([]).shape == (0, 3, 32, 32)


def test_preprocessor_is_deterministic_and_matches_transformers(clip_dir):
    preprocess = Preprocessor.from_pretrained(clip_dir)
    first, second = preprocess(_batch()), preprocess(_batch())
    np.testing.assert_array_equal(first, second)
    reference = CLIPImageProcessorPil.from_pretrained(clip_dir)(_batch(), return_tensors="np")
    np.testing.assert_array_equal(first, reference["pixel_values"])


def test_preprocessor_refuses_a_strip_that_resizing_would_blow_up(clip_dir):
    """A shortest-edge resize to 32 turns 39,063 x 1 into 1,250,016 x 32: 40,000,512 pixels,
    over the limit; 39,062 x 1 stays within it. (A real CLIP's 224 refuses far less thin.)"""
    preprocess = Preprocessor.from_pretrained(clip_dir)
    longest = images.MAX_IMAGE_PIXELS // 32 // 32
    preprocess.check(Image.new("RGB", (longest, 1)), "wide.png")
    with pytest.raises(InputError) as info:
        preprocess.check(Image.new("RGB", (1, longest + 1)), "tall.png")
    assert str(info.value) == (f"tall.png: 1x{longest + 1} is too elongated: resizing its short "
                               f"side to 32 would make {32 * 32 * (longest + 1)} pixels (limit "
                               f"{images.MAX_IMAGE_PIXELS})")
    with pytest.raises(InputError, match=rf"^image 2: 1x{longest + 1} is too elongated"):
        preprocess([load_image(_pixels()), Image.new("RGB", (1, longest + 1))])


def test_preprocessor_uses_pil_backend_without_warning(clip_dir, capfd):
    preprocess = Preprocessor.from_pretrained(clip_dir)
    assert "CLIPImageProcessorPil" in repr(preprocess)
    assert "torchvision" not in capfd.readouterr().err


def test_preprocessor_dict_round_trip(clip_dir):
    preprocess = Preprocessor.from_pretrained(clip_dir)
    config = preprocess.to_dict()
    assert config["crop_size"] == {"height": 32, "width": 32}
    assert isinstance(config["image_mean"], list)
    again = Preprocessor.from_dict(config)
    np.testing.assert_array_equal(again(_batch()), preprocess(_batch()))


def test_preprocessor_for_a_dinov2_style_config(tmp_path):
    BitImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 28, "width": 36}
    ).save_pretrained(tmp_path)
    preprocess = Preprocessor.from_pretrained(tmp_path)
    assert preprocess.image_size == (28, 36)
    assert preprocess(_batch()).shape == (3, 3, 28, 36)


def test_preprocessor_refuses_a_variable_output_size(tmp_path):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="depends on the input"):
        Preprocessor.from_pretrained(tmp_path)


def test_preprocessor_without_config(tmp_path):
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        Preprocessor.from_pretrained(tmp_path)
