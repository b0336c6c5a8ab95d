"""Robust image decoding for the embedding pipeline.

Every input ends as either a correctly decoded ``(size, size, 3)`` uint8 RGB array or an
:class:`ImageDecodeError` whose message is the human-readable reason written to the failures
table. Nothing here changes Pillow's global state (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
``False``, ``Image.MAX_IMAGE_PIXELS`` is left alone), so truncated files fail instead of being
silently padded with grey.

Only Pillow and numpy are used. Decodable formats are a fixed allow-list rather than "whatever
this Pillow build can open" (``semclust.embed.formats``, which also says what is an image by
name and content): results then do not depend on how Pillow was built on a given worker, and
Pillow's exotic plugins (EPS shells out to Ghostscript) never see untrusted bytes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semclust.config import RESIZE_MODES
from semclust.embed.formats import PIL_FORMATS, TGA_FOOTER, sniff_image_format

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageDecodeError",
    "decode_batch",
    "decode_image",
    "fit_pixels",
]

DEFAULT_MAX_PIXELS = 178_956_970  # == 2 * Pillow's default MAX_IMAGE_PIXELS

# Letterbox colour for resize="pad". Black is what most letterbox preprocessing uses and is
# kept distinct from the white we composite transparency onto.
PAD_COLOR = (0, 0, 0)
# Transparent pixels are composited onto white: their stored RGB is arbitrary (often black),
# and logos / product cut-outs are authored to be seen on white pages, so white reproduces what
# a person sees and makes the result independent of hidden colour values.
ALPHA_BACKGROUND = (255, 255, 255)

# Antialiased bilinear (Pillow scales the filter's support with the reduction, so it is not the
# aliasing kind): what Keras' and torchvision's ImageNet preprocessing use, and the resize is
# most of a typical photo's decode cost: 2.0 vs 3.3 ms for bicubic on a 500x375 JPEG, against
# 1.3 ms for the JPEG decode itself (benchmarks/embed_parts.py).
_RESAMPLE = Image.Resampling.BILINEAR
# reduce() by an integer factor first (fast box filter) while staying >= 3x the target size;
# quality is indistinguishable from a full pass at a fraction of the cost.
_REDUCING_GAP = 3.0
# How much of the blob decode_image hands to the sniffer: an SVG's "<svg" can follow a long
# XML prolog; all binary magics sit in the first 16 bytes.
_SNIFF_BYTES = 512


class ImageDecodeError(ValueError):
    """Reason an image cannot be used; str() is the human-readable reason for the failures/ row."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, oriented, RGB, square-resized image."""

    pixels: np.ndarray  # (size, size, 3) uint8 RGB
    width: int  # original width after EXIF orientation
    height: int  # original height after EXIF orientation


def _check_config(size: int, resize: str, max_pixels: int) -> None:
    """Configuration errors are raised up front (not turned into per-image failures)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; allowed values: {RESIZE_MODES}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")


def _draft_request(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """Smallest decode size libjpeg may scale down to without losing needed resolution."""
    if resize == "pad":
        # Only the long side has to reach `size`.
        long_side = max(width, height)
        return (
            max(1, -(-width * size // long_side)),
            max(1, -(-height * size // long_side)),
        )
    # center_crop needs the short side >= size, squash needs both: (size, size) covers both.
    return (size, size)


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale -> 8-bit "L", scaling instead of clipping.

    Integer data that fits 0..65535 is treated as 16-bit and scaled by the type range
    (x / 257, so 65535 -> 255 and 32768 -> 128), which keeps absolute brightness. Float data in
    0..1 is scaled by 255. Anything else (signed, >16-bit, arbitrary float) is stretched
    linearly from its own min..max.
    """
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise ImageDecodeError(f"unsupported pixel layout for mode {im.mode}: shape {arr.shape}")
    if arr.dtype.kind in "ui":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            # round(x / 257) in integer arithmetic (ties cannot occur since 257 is odd)
            out = (arr.astype(np.uint32) + 128) // 257
            return Image.fromarray(out.astype(np.uint8))
        data = arr.astype(np.float64)
    else:
        data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return Image.fromarray(np.rint(data * 255.0).astype(np.uint8))
    # A constant image has no range to stretch: map it to black.
    data = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(data)
    return Image.fromarray(np.rint(data).astype(np.uint8))


def _to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """Normalise any decoded mode to "RGB", or "RGBA" when there is transparency to honour."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        key = im.info.get("transparency")
        grey = _wide_to_8bit(im)
        if isinstance(key, int):
            # tRNS colour key of a 16-bit greyscale PNG: pixels equal to it are transparent.
            alpha = np.where(np.asarray(im) == key, 0, 255).astype(np.uint8)
            grey.putalpha(Image.fromarray(alpha))
            return grey.convert("RGBA")
        im, mode = grey, "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        # Via RGBA so palette / tRNS transparency is applied properly (and Pillow does not warn).
        if mode == "La":  # Pillow has no direct La -> RGBA conversion
            im = im.convert("LA")
        return im if mode == "RGBA" else im.convert("RGBA")
    return im if mode == "RGB" else im.convert("RGB")


def _fit(im: Image.Image, size: int, resize: str) -> Image.Image:
    """Resize an RGB/RGBA image to a (size, size) canvas according to `resize`."""
    w, h = im.size
    if resize == "squash":
        return im.resize((size, size), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if resize == "center_crop":
        # Scaling the short side to `size` then cropping the centre == resampling the centred
        # square of side min(w, h) straight to (size, size); one pass, no intermediate image.
        side = min(w, h)
        left = (w - side) / 2
        top = (h - side) / 2
        box = (left, top, left + side, top + side)
        return im.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
    # pad: fit the long side, centre on a square canvas (filled after alpha compositing).
    scale = size / max(w, h)
    nw = min(size, max(1, round(w * scale)))
    nh = min(size, max(1, round(h * scale)))
    return im.resize((nw, nh), _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _flatten(im: Image.Image) -> Image.Image:
    """RGBA -> RGB over ALPHA_BACKGROUND; RGB passes through."""
    if im.mode != "RGBA":
        return im
    background = Image.new("RGB", im.size, ALPHA_BACKGROUND)
    background.paste(im, mask=im.getchannel("A"))  # linear blend by alpha
    return background


def _decode_pil(
    data: bytes | None, size: int, resize: str, max_pixels: int
) -> tuple[Image.Image, int, int]:
    """Core decode; config must already be validated. Returns (RGB image, width, height)."""
    if data is None:
        raise ImageDecodeError("no data")
    if len(data) == 0:
        raise ImageDecodeError("empty file")
    head = bytes(data[:_SNIFF_BYTES])
    fmt = sniff_image_format(head)
    if fmt is None and bytes(data[-len(TGA_FOOTER) :]) == TGA_FOOTER:
        fmt = "tga"  # TGA 2: the signature is a footer, so only the whole file shows it
    if fmt is None:
        raise ImageDecodeError(
            f"not a recognised image format (file starts with 0x{head[:8].hex()})"
        )
    pil_format = PIL_FORMATS.get(fmt)
    if pil_format is None:
        raise ImageDecodeError(f"unsupported image format: {fmt}")

    try:
        # formats= pins Pillow to the sniffed plugin: no guessing across other parsers.
        with Image.open(io.BytesIO(data), formats=[pil_format]) as im:
            # Header only so far: check the pixel count before a single pixel is decoded.
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"invalid image dimensions: {width} x {height}")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width} x {height} pixels exceeds max_pixels={max_pixels}"
                )
            if im.format in ("JPEG", "MPO"):
                # libjpeg decodes straight at 1/2, 1/4 or 1/8 scale (much faster), never below
                # what the resize below needs.
                im.draft(None, _draft_request(width, height, size, resize))
            im.load()  # first frame only for animations; truncated data raises here
            drafted_size = im.size
            # Corrupt EXIF must not cost us otherwise valid pixels: keep the stored orientation.
            with contextlib.suppress(Exception):
                ImageOps.exif_transpose(im, in_place=True)
            if im.size != drafted_size:  # orientations 5-8 transpose the axes
                width, height = height, width
            rgb = _fit_rgb(im, size, resize)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its hard limit, or its warning when warnings are errors).
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        # Pillow's message embeds a BytesIO repr with a memory address: not useful in a report.
        raise ImageDecodeError(
            f"cannot decode {fmt} image: Pillow could not parse the {fmt} header"
        ) from exc
    except MemoryError as exc:
        raise ImageDecodeError(f"cannot decode {fmt} image: out of memory") from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode {fmt} image: {type(exc).__name__}: {exc}") from exc
    return rgb, width, height


def _fit_rgb(im: Image.Image, size: int, resize: str) -> Image.Image:
    """RGB(A) or any mode -> the (size, size) RGB picture the model sees."""
    rgb = _flatten(_fit(_to_rgb_or_rgba(im), size, resize))
    if resize == "pad" and rgb.size != (size, size):
        canvas = Image.new("RGB", (size, size), PAD_COLOR)
        canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
        rgb = canvas
    return rgb


def fit_pixels(im: Image.Image, size: int, resize: str) -> np.ndarray:
    """An already decoded picture (a video frame) resized as ``decode_image`` resizes images:
    (size, size, 3) uint8 RGB."""
    return np.asarray(_fit_rgb(im, size, resize), dtype=np.uint8)


def decode_image(
    data: bytes,
    size: int,
    resize: str = "center_crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode, EXIF-orient, convert to RGB and resize to (size, size).

    Raises ImageDecodeError with a reason for any bad image, ValueError for a bad `resize`,
    `size` or `max_pixels`. `max_pixels` is checked against the header before decoding; Pillow's
    own hard limit (2 * Image.MAX_IMAGE_PIXELS) still applies on top of it.
    """
    _check_config(size, resize, max_pixels)
    rgb, width, height = _decode_pil(data, int(size), resize, int(max_pixels))
    return DecodedImage(pixels=np.array(rgb, dtype=np.uint8), width=width, height=height)


def decode_batch(
    blobs: Sequence[bytes | None],
    size: int,
    resize: str = "center_crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Decode many images; never raises for a bad image.

    Returns ``pixels`` (N, size, size, 3) uint8 (zeros where failed), ``widths`` and ``heights``
    (N,) int32 (0 where failed) and ``errors`` (N strings, "" where ok). A ``None`` blob (the
    read failed upstream) becomes the error "no data". Config errors raise ValueError up front.
    """
    _check_config(size, resize, max_pixels)
    size = int(size)
    max_pixels = int(max_pixels)
    n = len(blobs)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    errors = [""] * n
    for i, blob in enumerate(blobs):
        try:
            rgb, width, height = _decode_pil(blob, size, resize, max_pixels)
            pixels[i] = np.asarray(rgb)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        except Exception as exc:  # last line of defence: fail one image, not the batch
            errors[i] = f"cannot decode image: {type(exc).__name__}: {exc}"
            continue
        widths[i] = width
        heights[i] = height
    return pixels, widths, heights, errors
