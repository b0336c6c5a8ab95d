"""Tests for semclust.embed.decode: every input is built here with Pillow/numpy (seeded)."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from semclust.config import RESIZE_MODES
from semclust.embed.decode import (
    DecodedImage,
    ImageDecodeError,
    decode_batch,
    decode_image,
)
from tests.embed.pictures import (
    BLUE,
    FAKE_AVIF,
    FAKE_HEIC,
    GREEN,
    RED,
    SVG,
    TEXT,
    close_to,
    encode,
    left_right,
    noise,
    reason,
    solid,
)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims huge dimensions but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------
# failures with a reason
# ---------------------------------------------------------------------------------------------


def test_empty_file() -> None:
    assert reason(b"") == "empty file"


def test_random_bytes_and_text_are_not_images() -> None:
    rnd = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "not a recognised image" in reason(rnd)
    r = reason(TEXT)
    assert "not a recognised image" in r
    assert TEXT[:8].hex() in r  # the reason shows what the file starts with


@pytest.mark.parametrize(("data", "fmt"), [(FAKE_HEIC, "heic"), (FAKE_AVIF, "avif"), (SVG, "svg")])
def test_recognised_but_unsupported(data: bytes, fmt: str) -> None:
    assert reason(data) == f"unsupported image format: {fmt}"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_fails(fmt: str) -> None:
    data = encode(noise(256, 256, seed=1), fmt)
    decode_image(data, 16)  # the intact file is fine
    r = reason(data[: len(data) // 2])
    assert r.startswith(f"cannot decode {fmt.lower()} image:")
    # the package must not have switched on Pillow's "pad truncated files with grey" mode
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_header_fails_with_format() -> None:
    r = reason(b"\x89PNG\r\n\x1a\n" + b"\x13" * 200)
    assert r.startswith("cannot decode png image:")
    assert "BytesIO" not in r  # no object reprs with memory addresses


def test_decompression_bomb_header_fails_fast() -> None:
    # 100000 x 100000 RGB would need 30 GB: it must be refused from the header alone.
    t0 = time.perf_counter()
    r = reason(png_header_only(100_000, 100_000))
    assert time.perf_counter() - t0 < 1.0
    assert r.startswith("image too large")


def test_max_pixels_is_checked_before_decoding() -> None:
    # 9000 x 9000 is below Pillow's own limits, so only our check stands between it and decoding
    # (the data is truncated: had it been decoded, the reason would say "cannot decode").
    t0 = time.perf_counter()
    r = reason(png_header_only(9000, 9000), max_pixels=1_000_000)
    assert time.perf_counter() - t0 < 1.0
    assert r == "image too large: 9000 x 9000 pixels exceeds max_pixels=1000000"
    # a perfectly normal image is refused too when the limit is small
    data = encode(solid(RED, (64, 64)), "PNG")
    assert reason(data, max_pixels=1000) == (
        "image too large: 64 x 64 pixels exceeds max_pixels=1000"
    )
    assert decode_image(data, 16, max_pixels=64 * 64).width == 64  # the limit is inclusive


def test_pillow_bomb_warning_as_error_is_caught() -> None:
    # Between Pillow's warning and error thresholds Pillow only warns; a process running with
    # warnings as errors must still get a failure row, not a crash.
    data = png_header_only(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert reason(data).startswith("image too large")


def test_invalid_resize_mode_is_a_config_error() -> None:
    good = encode(solid(RED), "PNG")
    for call in (
        lambda: decode_image(good, 16, resize="stretch"),
        lambda: decode_batch([good, None], 16, resize="stretch"),
        lambda: decode_batch([], 16, resize="stretch"),  # raised up front, even with no images
    ):
        with pytest.raises(ValueError, match="center_crop") as info:
            call()
        assert not isinstance(info.value, ImageDecodeError)
        assert "pad" in str(info.value) and "squash" in str(info.value)
    with pytest.raises(ValueError):
        decode_image(good, 0)


# ---------------------------------------------------------------------------------------------
# modes and colour handling
# ---------------------------------------------------------------------------------------------


def test_greyscale_and_bilevel() -> None:
    grey = decode_image(encode(solid(77, mode="L"), "PNG"), 8)
    assert grey.pixels.shape == (8, 8, 3) and grey.pixels.dtype == np.uint8
    assert np.all(grey.pixels == 77)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    out = decode_image(encode(bilevel, "PNG"), 8, resize="squash").pixels
    assert np.all(out[:, 0] == 255) and np.all(out[:, 7] == 0)


def test_cmyk_jpeg() -> None:
    data = encode(solid((0, 255, 255, 0), (32, 32), mode="CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    out = decode_image(data, 16).pixels
    assert close_to(out[8, 8], RED)


def test_16bit_png_scales_by_range_not_clipping() -> None:
    arr = np.zeros((8, 32), np.uint16)
    arr[:, 0:8] = 65535
    arr[:, 8:16] = 32768
    arr[:, 16:24] = 257
    arr[:, 24:32] = 0
    data = encode(Image.fromarray(arr), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # really 16-bit on disk
    # squash to the image's own width keeps columns separate
    out = decode_image(data, 32, resize="squash").pixels
    row = out[4, :, 0]
    assert row[4] == 255  # 65535 -> 255 (clipping would also give 255 ...)
    assert row[12] == 128  # ... but 32768 -> 128, not 255
    assert row[20] == 1  # 257 -> 1: scaled by the 16-bit range, not stretched by min..max
    assert row[28] == 0
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_16bit_big_endian_tiff() -> None:
    arr = np.full((8, 8), 32768, dtype=">u2")
    im = Image.frombytes("I;16B", (8, 8), arr.tobytes())
    data = encode(im, "TIFF")
    assert np.all(decode_image(data, 8).pixels == 128)


def test_16bit_png_with_transparent_key() -> None:
    arr = np.full((8, 8), 32768, np.uint16)
    arr[:, :4] = 0  # tRNS colour key below: these pixels are transparent
    data = encode(Image.fromarray(arr), "PNG", transparency=0)
    row = decode_image(data, 8, resize="squash").pixels[4, :, 0]
    assert np.all(row[:3] == 255) and np.all(row[5:] == 128)


def test_signed_32bit_tiff_is_stretched() -> None:
    arr = (np.arange(64, dtype=np.int32).reshape(8, 8) - 32) * 1000  # -32000 .. 31000
    out = decode_image(encode(Image.fromarray(arr), "TIFF"), 8, resize="squash").pixels
    assert out[0, 0, 0] == 0 and out[7, 7, 0] == 255


def test_float_tiff() -> None:
    unit = np.tile(np.linspace(0.0, 1.0, 8, dtype=np.float32), (8, 1))
    out = decode_image(encode(Image.fromarray(unit), "TIFF"), 8, resize="squash").pixels
    assert out[0, 0, 0] == 0 and out[0, 7, 0] == 255  # 0..1 floats -> 0..255
    wide = unit * 2000.0 - 1000.0  # arbitrary range: stretched from its min..max
    out = decode_image(encode(Image.fromarray(wide), "TIFF"), 8, resize="squash").pixels
    assert out[0, 0, 0] == 0 and out[0, 7, 0] == 255


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt: str) -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 - 2) * 3)  # index 0 black, 1 blue
    im.paste(1, (8, 0, 16, 16))
    data = encode(im, fmt, transparency=0)
    out = decode_image(data, 16, resize="squash").pixels
    assert np.all(out[:, :7] == 255)  # transparent black -> white, not black
    assert close_to(out[8, 12], BLUE, tol=0)


def test_palette_without_transparency() -> None:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 - 2) * 3)
    assert np.all(decode_image(encode(im, "PNG"), 8).pixels == np.array(GREEN, np.uint8))


def test_rgba_transparent_area_becomes_white() -> None:
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[:, :8] = (10, 200, 30, 0)  # fully transparent, with a hidden colour
    arr[:, 8:] = (0, 0, 255, 255)  # opaque blue
    arr[0:4, 8:] = (255, 0, 0, 128)  # half-transparent red
    out = decode_image(encode(Image.fromarray(arr), "PNG"), 16, resize="squash").pixels
    assert np.all(out[4:, :6] == 255)
    assert close_to(out[10, 13], BLUE, tol=0)
    assert close_to(out[1, 13], (255, 127, 127), tol=2)  # red blended over white


def test_la_alpha() -> None:
    im = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    assert np.all(decode_image(encode(im, "PNG"), 8).pixels == 255)


# ---------------------------------------------------------------------------------------------
# orientation
# ---------------------------------------------------------------------------------------------


def exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "swapped", "red_at"),
    [
        (1, False, "left"),
        (2, False, "right"),  # mirrored
        (3, False, "right"),  # rotated 180
        (6, True, "top"),  # stored sideways; display = rotate 90 degrees clockwise
        (8, True, "bottom"),  # rotate 90 degrees counter-clockwise
    ],
)
def test_exif_orientation(orientation: int, swapped: bool, red_at: str) -> None:
    data = exif_jpeg(left_right(64, 32, RED, BLUE), orientation)
    got = decode_image(data, 32, resize="squash")
    assert (got.width, got.height) == ((32, 64) if swapped else (64, 32))
    px = got.pixels
    probes = {"left": px[16, 4], "right": px[16, 27], "top": px[4, 16], "bottom": px[27, 16]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    assert close_to(probes[red_at], RED, tol=30)
    assert close_to(probes[opposite[red_at]], BLUE, tol=30)


# ---------------------------------------------------------------------------------------------
# frames, sizes and resize modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(fmt: str) -> None:
    frames = [solid(c, (16, 16)) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    out = decode_image(data, 8).pixels
    assert close_to(out[4, 4], RED, tol=8)


def test_one_pixel() -> None:
    got = decode_image(encode(solid((12, 34, 56), (1, 1)), "PNG"), 16)
    assert (got.width, got.height) == (1, 1)
    assert np.all(got.pixels == np.array((12, 34, 56), np.uint8))


def test_very_wide_image_in_every_mode() -> None:
    arr = np.zeros((10, 5000, 3), np.uint8)
    arr[:, :2495] = RED
    arr[:, 2495:2505] = GREEN
    arr[:, 2505:] = BLUE
    data = encode(Image.fromarray(arr), "PNG")
    crop = decode_image(data, 32, resize="center_crop")
    assert (crop.width, crop.height) == (5000, 10)
    # only the centre 10x10 survives (edges blend a little with the neighbours, exactly as
    # scaling the whole image and then cropping does)
    assert np.all(crop.pixels[:, 6:26] == np.array(GREEN, np.uint8))
    assert crop.pixels[..., 1].min() > 128 and crop.pixels[..., [0, 2]].max() < 128
    squash = decode_image(data, 32, resize="squash").pixels
    assert close_to(squash[16, 2], RED, tol=0) and close_to(squash[16, 29], BLUE, tol=0)
    pad = decode_image(data, 32, resize="pad").pixels
    assert pad.shape == (32, 32, 3)
    content_rows = np.flatnonzero(pad.reshape(32, -1).any(axis=1))
    assert len(content_rows) == 1  # 10/5000*32 rounds to 0; we keep at least one row
    assert content_rows[0] in (15, 16)


def test_resize_modes() -> None:
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = RED
    arr[:, 50:150] = GREEN
    arr[:, 150:] = BLUE
    data = encode(Image.fromarray(arr), "PNG")
    assert RESIZE_MODES == ("center_crop", "squash", "pad")
    outs = {m: decode_image(data, 64, resize=m) for m in RESIZE_MODES}
    for got in outs.values():
        assert got.pixels.shape == (64, 64, 3) and got.pixels.dtype == np.uint8
        assert (got.width, got.height) == (200, 100)
    # center_crop: the centred 100x100 square is all green
    crop = outs["center_crop"].pixels
    assert np.all(crop[:, 4:60] == np.array(GREEN, np.uint8))
    assert crop[..., 1].min() > 128 and crop[..., [0, 2]].max() < 128
    # squash: all three bands, squeezed horizontally
    sq = outs["squash"].pixels
    assert close_to(sq[32, 4], RED, 0) and close_to(sq[32, 32], GREEN, 0)
    assert close_to(sq[32, 60], BLUE, 0)
    # pad: 64x32 content centred, black bars top and bottom
    pad = outs["pad"].pixels
    assert np.all(pad[:16] == 0) and np.all(pad[48:] == 0)
    assert close_to(pad[32, 4], RED, 0) and close_to(pad[32, 60], BLUE, 0)


def test_large_jpeg_uses_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    drafted: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: object) -> object:
        result = original(self, mode, size)  # type: ignore[arg-type]
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = encode(left_right(2000, 1500, RED, BLUE), "JPEG", quality=90)
    got = decode_image(data, 64)
    assert (got.width, got.height) == (2000, 1500)  # original size, not the drafted one
    assert len(drafted) == 1
    w, h = drafted[0]
    assert min(w, h) >= 64  # libjpeg never scaled below what we need ...
    assert w <= 2000 // 8 + 1  # ... but did scale down (1/8 here)
    assert close_to(got.pixels[32, 1], RED, 30) and close_to(got.pixels[32, 62], BLUE, 30)
    # pad needs only the long side: a wide image may decode with the short side below `size`
    drafted.clear()
    data = encode(left_right(4000, 400, RED, BLUE), "JPEG", quality=90)
    got = decode_image(data, 64, resize="pad")
    assert max(drafted[0]) >= 64 and drafted[0][0] == 500


def test_decoded_image_type() -> None:
    got = decode_image(encode(solid(RED), "BMP"), 4)
    assert isinstance(got, DecodedImage)
    got.pixels[0, 0] = 0  # callers get a writable array of their own
    with pytest.raises(AttributeError):
        got.width = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


def test_decode_batch_mixed() -> None:
    good_jpeg = encode(solid(RED, (40, 20)), "JPEG", quality=95)
    good_png = encode(solid(BLUE, (10, 30)), "PNG")
    truncated = encode(noise(128, 128, seed=3), "PNG")
    truncated = truncated[: len(truncated) // 2]
    blobs: list[bytes | None] = [
        good_jpeg,
        None,
        b"",
        np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        truncated,
        FAKE_HEIC,
        png_header_only(100_000, 100_000),
        good_png,
    ]
    pixels, widths, heights, errors = decode_batch(blobs, 16)
    assert pixels.shape == (8, 16, 16, 3) and pixels.dtype == np.uint8
    assert widths.dtype == np.int32 and heights.dtype == np.int32
    assert isinstance(errors, list) and len(errors) == 8
    assert errors[0] == "" and errors[7] == ""
    assert errors[1] == "no data"
    assert errors[2] == "empty file"
    assert "not a recognised image" in errors[3]
    assert errors[4].startswith("cannot decode png image:")
    assert errors[5] == "unsupported image format: heic"
    assert errors[6].startswith("image too large")
    assert widths.tolist() == [40, 0, 0, 0, 0, 0, 0, 10]
    assert heights.tolist() == [20, 0, 0, 0, 0, 0, 0, 30]
    assert close_to(pixels[0, 8, 8], RED, 8)
    assert np.all(pixels[7] == np.array(BLUE, np.uint8))
    assert not pixels[1:7].any()  # failed rows are zeros


def test_decode_batch_empty_and_memoryview() -> None:
    pixels, widths, _, errors = decode_batch([], 8)
    assert pixels.shape == (0, 8, 8, 3) and widths.shape == (0,) and errors == []
    data = encode(solid(GREEN), "PNG")
    pixels, widths, _, errors = decode_batch([memoryview(data), bytearray(data)], 8)
    assert errors == ["", ""] and widths.tolist() == [8, 8]
    assert np.all(pixels == np.array(GREEN, np.uint8))
