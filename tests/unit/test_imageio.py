"""decode_image and decode_batch on real files written by Pillow: formats, modes, orientation,
bad input, and how often a file is opened."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from emotr.config import DecodeConfig
from emotr.data.imageio import (
    DECODE_RULES_VERSION,
    DecodeError,
    _in_keys,
    decode_batch,
    decode_image,
    decode_image_with_size,
    decode_rules,
    hash_keys,
)

MAX_PIXELS = DecodeConfig().max_pixels
RED = (200, 30, 30)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, size: tuple[int, int] = (16, 24), **kwargs) -> np.ndarray:
    kwargs.setdefault("max_pixels", MAX_PIXELS)
    pixels = decode_image(data, size, **kwargs)
    assert pixels.shape == (*size, 3)
    assert pixels.dtype == np.uint8
    return pixels


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims width x height but holds almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


FORMATS = ["JPEG", "PNG", "BMP", "GIF", "TIFF"] + (["WEBP"] if features.check("webp") else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_decode_to_the_colour_of_the_file(fmt):
    data = encode(Image.new("RGB", (48, 32), RED), fmt)
    pixels = decode(data)
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(axis=0), RED, atol=6)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (24, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert tuple(decode(data)[8, 12]) == (255, 0, 0)


def test_palette_image():
    data = encode(Image.new("RGB", (24, 16), RED).quantize(colors=4), "PNG")
    assert tuple(decode(data)[0, 0]) == RED


def test_palette_transparency_shows_the_background():
    image = Image.new("P", (24, 16), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * (3 * 254))
    image.putpixel((0, 0), 0)
    data = encode(image, "PNG", transparency=0)
    pixels = decode(data, background=(0, 0, 255))
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[8, 12]) == RED


def test_grey_modes():
    assert tuple(decode(encode(Image.new("L", (24, 16), 100), "PNG"))[3, 3]) == (100, 100, 100)
    two_level = Image.new("1", (24, 16), 0)
    two_level.paste(1, (12, 0, 24, 16))
    pixels = decode(encode(two_level, "PNG"))
    assert tuple(pixels[8, 2]) == (0, 0, 0)
    assert tuple(pixels[8, 21]) == (255, 255, 255)


def test_grey_with_alpha_composites_onto_the_background():
    image = Image.new("LA", (24, 16), (100, 255))
    image.putpixel((0, 0), (100, 0))
    pixels = decode(encode(image, "PNG"), background=(10, 20, 30))
    assert tuple(pixels[0, 0]) == (10, 20, 30)
    assert tuple(pixels[8, 12]) == (100, 100, 100)


def test_sixteen_bit_mid_grey_stays_mid_grey():
    image = Image.fromarray(np.full((16, 24), 32768, dtype=np.uint16))
    assert image.mode == "I;16"
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode in {"I;16", "I"}
    assert tuple(decode(data)[8, 12]) == (128, 128, 128)


def test_32_bit_integer_and_float_images():
    as_int = Image.fromarray(np.full((16, 24), 65535, dtype=np.int32))
    assert as_int.mode == "I"
    assert tuple(decode(encode(as_int, "TIFF"))[8, 12]) == (255, 255, 255)
    as_float = Image.fromarray(np.full((16, 24), 100.0, dtype=np.float32))
    assert as_float.mode == "F"
    assert tuple(decode(encode(as_float, "TIFF"))[8, 12]) == (100, 100, 100)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    np.testing.assert_allclose(decode(data)[8, 12], (255, 0, 0), atol=8)


def test_rgba_transparent_pixel_shows_the_background():
    image = Image.new("RGBA", (24, 16), (*RED, 255))
    image.putpixel((0, 0), (0, 255, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    pixels = decode(encode(image, "PNG"), background=(255, 255, 255))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    np.testing.assert_allclose(pixels[0, 1], (127, 127, 127), atol=1)
    assert tuple(pixels[8, 12]) == RED


def test_exif_orientation_is_applied():
    # Stored landscape (40 wide, 20 high) with a green top-left corner; orientation 6 means
    # "rotate 90 degrees clockwise to display", so the corner ends up top-right of a portrait.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((0, 255, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif, quality=95)
    pixels = decode(data, size=(40, 20))
    np.testing.assert_allclose(pixels[2, 17], (0, 255, 0), atol=20)
    np.testing.assert_allclose(pixels[2, 2], (0, 0, 255), atol=20)
    np.testing.assert_allclose(pixels[37, 17], (0, 0, 255), atol=20)


def test_resize_squashes_without_cropping():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 6, 20))
    pixels = decode(encode(image, "PNG"), size=(32, 32))
    assert tuple(pixels[16, 0]) == (255, 0, 0)  # the left tenth survives: nothing was cropped


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) * 2 // 3]


BAD_FILES = {
    "zero bytes": (b"", "empty file"),
    "text named .jpg": (b"this is not a picture\n", "not an image"),
    "truncated jpeg": (_truncated_jpeg(), "truncated"),
    "noise after png signature": (
        b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(256),
        "not an image",
    ),
    "60000x60000 png header": (
        png_header_only(60000, 60000),
        "too many pixels: 3600000000 > 89478485 (decode.max_pixels)",
    ),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_decode_error_with_a_reason(name):
    data, reason = BAD_FILES[name]
    before = bytes(data)
    with pytest.raises(DecodeError) as caught:
        decode_image(data, (16, 16), max_pixels=MAX_PIXELS)
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason
    assert data == before


def test_own_pixel_cap_fires_before_decoding():
    data = encode(Image.new("RGB", (40, 30), RED), "PNG")
    with pytest.raises(DecodeError, match=r"too many pixels: 1200 > 1000 \(decode.max_pixels\)"):
        decode_image(data, (16, 16), max_pixels=1000)


def test_pillow_bomb_warning_is_an_error(monkeypatch):
    # Between Pillow's cap and twice it Pillow only warns; it must still be refused.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("RGB", (12, 12), RED), "PNG")
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(data, (16, 16), max_pixels=10_000)


def test_decode_rules_describe_the_config():
    rules = decode_rules(DecodeConfig(background=(0, 0, 0)))
    assert rules["decode_rules_version"] == DECODE_RULES_VERSION
    assert rules["background"] == "0,0,0"
    assert rules != decode_rules(DecodeConfig())
    assert all(isinstance(value, str) for value in rules.values())


def rotated_jpeg(width: int = 40, height: int = 20) -> bytes:
    """A JPEG stored width x height; its EXIF orientation (6) turns it upright: height x width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (width, height), RED), "JPEG", exif=exif)


def batch_of(paths) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch of (path, sha256), as extraction hands it to decode_batch."""
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
    return {"path": np.array([str(p) for p in paths], object), "sha256": np.array(hashes, object)}


def test_decode_batch_opens_each_image_once(tmp_path, monkeypatch):
    paths = [tmp_path / "rotated.jpg", tmp_path / "plain.png"]
    paths[0].write_bytes(rotated_jpeg())
    paths[1].write_bytes(encode(Image.new("RGB", (30, 10), RED), "PNG"))
    opened: list[str] = []
    real_open = Image.open

    def counting_open(file, *args, **kwargs):  # instrumentation: the real open still runs
        opened.append(repr(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    out = decode_batch(batch_of(paths), (16, 24), MAX_PIXELS, (255, 255, 255))
    assert out["ok"].tolist() == [True, True]
    assert len(opened) == len(paths), opened
    # The upright size of the original comes out of that one opening.
    assert out["height"].tolist() == [40, 10] and out["width"].tolist() == [20, 30]
    assert out["pixels"].shape == (2, 16, 24, 3)


def test_decode_batch_turns_bad_and_changed_files_into_reasons(tmp_path):
    good, bad, changed = tmp_path / "good.png", tmp_path / "bad.jpg", tmp_path / "changed.png"
    good.write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    bad.write_bytes(b"not an image")
    changed.write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    batch = batch_of([good, bad, changed])
    changed.write_bytes(encode(Image.new("RGB", (8, 8), (0, 0, 255)), "PNG"))
    out = decode_batch(batch, (8, 8), MAX_PIXELS, (255, 255, 255))
    assert out["ok"].tolist() == [True, False, False]
    assert out["reason"][1].startswith("not an image")
    assert "changed since it was listed" in out["reason"][2]
    assert out["height"][1] == 0 and not out["pixels"][1].any()


def test_decode_batch_learns_unknown_hashes_and_does_not_decode_cached_images(
    tmp_path, monkeypatch
):
    new, cached, broken = tmp_path / "new.png", tmp_path / "cached.png", tmp_path / "broken.jpg"
    new.write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    cached.write_bytes(encode(Image.new("RGB", (8, 8), (0, 0, 255)), "PNG"))
    broken.write_bytes(b"not an image")
    expected = batch_of([new, cached, broken])["sha256"].tolist()
    unknown = {"path": np.array([str(new), str(cached), str(broken)], object)}
    unknown["sha256"] = np.array(["", "", ""], object)
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda file, *a, **k: opened.append(1) or real_open(file))

    out = decode_batch(unknown, (8, 8), MAX_PIXELS, (255, 255, 255), skip=hash_keys([expected[1]]))

    assert out["sha256"].tolist() == expected  # hashed from the bytes read, bad ones too
    assert out["ok"].tolist() == [True, False, False]
    assert out["cached"].tolist() == [False, True, False]
    assert out["reason"][1] == "" and out["reason"][2].startswith("not an image")
    assert len(opened) == 2  # the cached image was read and hashed, never decoded


def test_hash_keys_match_only_the_hashes_given():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000)]
    keys = hash_keys(hashes[:500])
    assert all(_in_keys(keys, h) for h in hashes[:500])
    assert not any(_in_keys(keys, h) for h in hashes[500:])
    assert not _in_keys(hash_keys([]), hashes[0])


def test_decode_image_with_size_gives_the_upright_original_size():
    decoded = decode_image_with_size(rotated_jpeg(), (16, 24), max_pixels=MAX_PIXELS)
    assert (decoded.height, decoded.width) == (40, 20)
    assert decoded.pixels.shape == (16, 24, 3)


def gradient_png(width: int = 50, height: int = 30) -> bytes:
    """Noise over gradients: every filter gives its own pixels."""
    rng = np.random.default_rng(8)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 5, y * 8, (x * y) % 256], -1) + rng.integers(0, 40, (height, width, 3))
    return encode(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), "PNG")


@pytest.mark.parametrize(
    ("resize", "pillow_filter"),
    [("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST)],
)
def test_decode_resize_gives_the_pixels_of_pillows_filter(resize, pillow_filter):
    data = gradient_png()
    expected = Image.open(io.BytesIO(data)).convert("RGB").resize((24, 16), pillow_filter)
    np.testing.assert_array_equal(decode(data, resize=resize), np.asarray(expected))
    # Upscaling too (the tutorial's 400 x 500 from smaller photos).
    expected = Image.open(io.BytesIO(data)).convert("RGB").resize((80, 64), pillow_filter)
    np.testing.assert_array_equal(decode(data, (64, 80), resize=resize), np.asarray(expected))


def test_nearest_and_bilinear_differ_and_bilinear_stays_the_default():
    data = gradient_png()
    assert DecodeConfig().resize == "bilinear"
    np.testing.assert_array_equal(decode(data), decode(data, resize="bilinear"))
    assert not np.array_equal(decode(data, resize="nearest"), decode(data, resize="bilinear"))
    with pytest.raises(ValueError, match=r"decode\.resize.*'cubic'"):
        decode(data, resize="cubic")


def test_decode_rules_name_the_resize_filter_and_keep_the_old_bilinear_text():
    # The text every cache made before decode.resize hashed: the default's fingerprints stay.
    old = "pillow-bilinear,reducing_gap=None,no-crop,squash"
    assert decode_rules(DecodeConfig())["resize"] == old
    nearest = decode_rules(DecodeConfig(resize="nearest"))
    assert nearest["resize"] == "pillow-nearest,reducing_gap=None,no-crop,squash"
    assert {k: v for k, v in nearest.items() if k != "resize"} == {
        k: v for k, v in decode_rules(DecodeConfig()).items() if k != "resize"
    }


def test_decode_batch_resizes_with_the_given_filter(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(gradient_png())
    out = decode_batch(batch_of([path]), (16, 24), MAX_PIXELS, (255, 255, 255), resize="nearest")
    assert out["ok"].all()
    np.testing.assert_array_equal(out["pixels"][0], decode(gradient_png(), resize="nearest"))
