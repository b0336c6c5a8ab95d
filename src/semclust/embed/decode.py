"""Robust image decoding for the embedding pipeline.

Every input ends as either a correctly decoded ``(size, size, 3)`` uint8 RGB array or an
:class:`ImageDecodeError` whose message is the human-readable reason written to the failures
table. Nothing here changes Pillow's global state (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
``False``, ``Image.MAX_IMAGE_PIXELS`` is left alone), so truncated files fail instead of being
silently padded with grey.

Only Pillow and numpy are used. Decodable formats are a fixed allow-list rather than "whatever
this Pillow build can open": results then do not depend on how Pillow was built on a given
worker, and Pillow's exotic plugins (EPS shells out to Ghostscript) never see untrusted bytes.

What is an image, by content: every format Pillow registers is put in one group below
(``DECODED_FORMATS``, ``UNSUPPORTED_FORMATS``, ``IGNORED_FORMATS``; a test checks that against the
installed Pillow, so an upgrade that adds a plugin asks for a decision). The signatures are
Pillow's own (each plugin's registered ``_accept``), tightened where Pillow's is weak enough to
claim text, and the extensions are Pillow's ``registered_extensions()``. Decoded: JPEG (and
MPO), PNG, GIF, WebP, BMP, TIFF, ICO, CUR, ICNS, DDS, QOI, PCX, PPM/PGM/PBM/PNM/PFM, SGI, TGA,
BLP, MSP: raster image files that Pillow reads with its own code (no external program, no
library its wheels might lack), each tested on a file Pillow wrote. TGA has no leading
signature: it is listed by extension and recognised by the ``TRUEVISION-XFILE`` footer that
TGA 2 files (and Pillow) write.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DECODED_FORMATS",
    "IGNORED_FORMATS",
    "IMAGE_EXTENSIONS",
    "KNOWN_UNSUPPORTED_EXTENSIONS",
    "RESIZE_MODES",
    "UNSUPPORTED_FORMATS",
    "DecodedImage",
    "ImageDecodeError",
    "decode_batch",
    "decode_image",
    "is_image_candidate",
    "sniff_image_format",
]

# Pillow format id -> the name ``sniff_image_format`` returns, for the formats decoded here.
DECODED_FORMATS: dict[str, str] = {
    "JPEG": "jpeg",
    "MPO": "jpeg",  # multi-picture JPEG (camera stereo/depth): Pillow's JPEG opener returns it
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "ICO": "ico",
    "CUR": "cur",
    "ICNS": "icns",
    "DDS": "dds",
    "QOI": "qoi",
    "PCX": "pcx",
    "PPM": "ppm",
    "SGI": "sgi",
    "TGA": "tga",
    "BLP": "blp",
    "MSP": "msp",
}

# Images Pillow can open that we list (a failure row with the reason) but do not decode.
UNSUPPORTED_FORMATS: dict[str, str] = {
    "JPEG2000": "needs the optional OpenJPEG library, which a Pillow build may lack",
    "AVIF": "needs the optional libavif, which a Pillow build may lack",
    "PSD": "Pillow reads only the flattened composite, which a layered file may not hold",
    # Pillow reads these but cannot write them, so no test file of them exists here.
    "SUN": "read-only in Pillow: untested",
    "DCX": "read-only in Pillow: untested",
    "XPM": "read-only in Pillow: untested",
    "FTEX": "read-only in Pillow: untested",
    "PIXAR": "read-only in Pillow: untested",
    "FLI": "read-only in Pillow: untested",
    "PCD": "read-only in Pillow: untested",
}

# Formats Pillow registers that are not image files for this pipeline, or whose signature would
# claim other files (they are neither listed by content nor decoded).
IGNORED_FORMATS: dict[str, str] = {
    "EPS": "PostScript, a page description; Pillow renders it with Ghostscript",
    "WMF": "vector metafile; Pillow has only a stub outside Windows",
    "BUFR": "meteorological data; a stub in Pillow",
    "GRIB": "meteorological data; a stub in Pillow",
    "HDF5": "scientific data; a stub in Pillow",
    "MPEG": "video; Pillow only identifies it",
    "FITS": "astronomical data arrays, not pictures",
    "SPIDER": "electron-microscopy data, no signature",
    "MCIDAS": "satellite data with an 8-byte signature of zeros and a 4",
    "IM": "Pillow's own interchange format, no signature",
    "IMT": "no signature",
    "IPTC": "no signature",
    "GBR": "GIMP brush; its signature is two small integers",
    "XBM": "C source; its signature (#define) is that of any C header",
    "DIB": "headerless BMP; its signature (a 4-byte header size) matches many files",
    "XVTHUMB": "XV's thumbnail cache",
}


def _pillow_registry() -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Pillow's registered ``_accept`` per format and its extensions per format (all plugins)."""
    Image.init()
    accepts = {fid: accept for fid, (_, accept) in Image.OPEN.items()}
    extensions: dict[str, list[str]] = {}
    for ext, fid in Image.registered_extensions().items():
        extensions.setdefault(fid, []).append(ext.lower())
    return accepts, extensions


_ACCEPTS, _EXTENSIONS = _pillow_registry()

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ext for fid in DECODED_FORMATS for ext in _EXTENSIONS.get(fid, ())
)

# Image formats we list (so each one shows up as a failure row with a reason instead of being
# silently skipped) but do not decode. Pillow can read some of them (AVIF, JPEG 2000, PSD) when
# built with the right libraries; we still refuse them so every worker behaves the same.
KNOWN_UNSUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {
        # HEIF family (iPhone photos) and AVIF
        ".heic",
        ".heif",
        ".hif",
        ".avif",
        ".avifs",
        # vector
        ".svg",
        ".svgz",
        # JPEG 2000 and JPEG XL
        ".jp2",
        ".j2k",
        ".j2c",
        ".jpf",
        ".jpx",
        ".jpm",
        ".jxl",
        # Photoshop
        ".psd",
        ".psb",
        # camera raw
        ".raw",
        ".dng",
        ".cr2",
        ".cr3",
        ".crw",
        ".nef",
        ".nrw",
        ".arw",
        ".srf",
        ".sr2",
        ".orf",
        ".rw2",
        ".raf",
        ".pef",
        ".srw",
        ".x3f",
        ".erf",
        ".kdc",
        ".dcr",
        ".mrw",
        ".3fr",
        ".mef",
        ".mos",
        ".iiq",
        ".rwl",
    }
    | {ext for fid in UNSUPPORTED_FORMATS for ext in _EXTENSIONS.get(fid, ())}
)

RESIZE_MODES = ("center_crop", "squash", "pad")

DEFAULT_MAX_PIXELS = 178_956_970  # == 2 * Pillow's default MAX_IMAGE_PIXELS

# Sniffed format -> Pillow format id. Anything sniffed but not in here is "unsupported".
_PIL_FORMATS = {name: fid for fid, name in DECODED_FORMATS.items() if fid != "MPO"}


def _whitespace_at(i: int) -> Callable[[bytes], bool]:
    return lambda head: head[i : i + 1] in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c")


# Checks on top of Pillow's ``_accept`` where that alone could claim other files: PPM's is "P"
# and a digit or f/y (text: "Python", "P5-gallery"), and the format puts whitespace next; PCX's
# and SGI's are two bytes, and the next two are fields with few valid values; an icon file lists
# at least one image. Each is what the format's specification requires.
_SIGNATURE_GUARDS: dict[str, Callable[[bytes], bool]] = {
    "PPM": _whitespace_at(2),
    "PCX": lambda head: len(head) >= 4 and head[2] == 1 and head[3] in (1, 2, 4, 8),
    "SGI": lambda head: len(head) >= 4 and head[2] in (0, 1) and head[3] in (1, 2),
    "ICO": lambda head: head[4:6] not in (b"", b"\0", b"\0\0"),
    "CUR": lambda head: head[4:6] not in (b"", b"\0", b"\0\0"),
}

# Formats sniffed with Pillow's signatures, after the hand-written checks of
# sniff_image_format (which keep their own names for JPEG ... TIFF, HEIF, SVG, raw, ...).
_PILLOW_SNIFFED: tuple[str, ...] = tuple(
    fid
    for fid in (*DECODED_FORMATS, *UNSUPPORTED_FORMATS)
    if fid not in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "JPEG2000", "AVIF", "PSD")
    and _ACCEPTS.get(fid) is not None
)
_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"

# Letterbox colour for resize="pad". Black is what most letterbox preprocessing uses and is
# kept distinct from the white we composite transparency onto.
PAD_COLOR = (0, 0, 0)
# Transparent pixels are composited onto white: their stored RGB is arbitrary (often black),
# and logos / product cut-outs are authored to be seen on white pages, so white reproduces what
# a person sees and makes the result independent of hidden colour values.
ALPHA_BACKGROUND = (255, 255, 255)

_RESAMPLE = Image.Resampling.BICUBIC
# reduce() by an integer factor first (fast box filter) while staying >= 3x the target size;
# quality is indistinguishable from a full bicubic pass at a fraction of the cost.
_REDUCING_GAP = 3.0

_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2"}
_BMP_DIB_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
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


# --------------------------------------------------------------------------------------------
# Sniffing / listing
# --------------------------------------------------------------------------------------------


def _sniff_isobmff(head: bytes) -> str | None:
    """HEIF/AVIF/CR3 from an ISO-BMFF 'ftyp' box; plain video (mp4, mov) -> None."""
    major = head[8:12]
    box_size = int.from_bytes(head[0:4], "big")
    end = min(len(head), box_size) if box_size >= 16 else len(head)
    brands = [major] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    if major in _AVIF_BRANDS:
        return "avif"
    if major in _HEIC_BRANDS:
        return "heic"
    if major == b"crx ":
        return "cr3"
    if major in _HEIF_BRANDS or any(b in _HEIF_BRANDS for b in brands):
        # Generic HEIF container: the compatible brands say what is inside.
        if any(b in _AVIF_BRANDS for b in brands):
            return "avif"
        if any(b in _HEIC_BRANDS for b in brands):
            return "heic"
        return "heif"
    if any(b in _AVIF_BRANDS for b in brands):
        return "avif"
    if any(b in _HEIC_BRANDS for b in brands):
        return "heic"
    return None


def _sniff_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg"):
        return True
    if text.startswith((b"<?xml", b"<!--", b"<!doctype")):
        return b"<svg" in text or b"<!doctype svg" in text
    return False


def sniff_image_format(head: bytes) -> str | None:
    """Format name from the first bytes of a file, or None if it does not look like an image.

    Decodable: "jpeg", "png", "gif", "webp", "bmp", "tiff", and by Pillow's signatures "ico",
    "cur", "icns", "dds", "qoi", "pcx", "ppm", "sgi", "blp", "msp" (TGA has no leading
    signature: see ``_decode_pil``). Recognised but unsupported: "heic", "heif", "avif", "svg",
    "jp2", "jxl", "psd", "cr2", "cr3", "orf", "rw2", "raf", and "sun", "dcx", "xpm", "ftex",
    "pixar", "fli". 64 bytes are enough for every binary format (Pillow's signatures need 16);
    more only helps an SVG with a long XML prolog. TIFF-based raws (NEF, ARW, DNG) are
    indistinguishable from TIFF here and report "tiff".
    """
    head = bytes(head)
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 18:
        # "BM" alone is too weak (text can start with it): also require a known DIB header size.
        if int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES:
            return "bmp"
        return None
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "cr2" if head[8:10] == b"CR" else "tiff"
    if head.startswith((b"II+\x00", b"MM\x00+")):  # BigTIFF
        return "tiff"
    if head.startswith((b"IIRO", b"IIRS", b"MMOR")):
        return "orf"
    if head.startswith(b"IIU\x00"):
        return "rw2"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "raf"
    if head[4:8] == b"ftyp":
        return _sniff_isobmff(head)
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jp2"
    if head.startswith((b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\xff\x0a")):
        return "jxl"
    if head.startswith(b"8BPS"):
        return "psd"
    if _sniff_svg(head):
        return "svg"
    return _sniff_pillow(head)


def _sniff_pillow(head: bytes) -> str | None:
    """The first of the ``_PILLOW_SNIFFED`` formats whose Pillow signature (and guard) matches."""
    for fid in _PILLOW_SNIFFED:
        try:
            # A plugin may answer with a message string (a missing library): only True counts.
            if _ACCEPTS[fid](head) is not True:
                continue
        except Exception:  # a signature check reading past a short head: no match
            continue
        guard = _SIGNATURE_GUARDS.get(fid)
        if guard is None or guard(head):
            return DECODED_FORMATS.get(fid) or fid.lower()
    return None


def _extension(path: str) -> str:
    # Paths are posix-like (local, s3://, gs://); only the last component can carry the suffix.
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower()


def is_image_candidate(path: str, head: bytes | None = None) -> bool:
    """True if the file should be listed as an image.

    Known image extensions (decodable or known-unsupported, case-insensitive) are listed without
    looking at the content, so a corrupt ``.jpg`` still gets a failure row. Any other extension
    (including none) is decided by sniffing ``head``; ``head=None`` means "not an image".
    """
    ext = _extension(path)
    if ext in IMAGE_EXTENSIONS or ext in KNOWN_UNSUPPORTED_EXTENSIONS:
        return True
    if head is None:
        return False
    return sniff_image_format(head) is not None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


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
    if fmt is None and bytes(data[-len(_TGA_FOOTER) :]) == _TGA_FOOTER:
        fmt = "tga"  # TGA 2: the signature is a footer, so only the whole file shows it
    if fmt is None:
        raise ImageDecodeError(
            f"not a recognised image format (file starts with 0x{head[:8].hex()})"
        )
    pil_format = _PIL_FORMATS.get(fmt)
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
            rgb = _flatten(_fit(_to_rgb_or_rgba(im), size, resize))
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

    if resize == "pad" and rgb.size != (size, size):
        canvas = Image.new("RGB", (size, size), PAD_COLOR)
        canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
        rgb = canvas
    return rgb, width, height


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
