"""What is an image file, by name and by content: the formats Pillow registers, each given a
decision (decoded, listed but unsupported, ignored), and the sniffing of a file's first bytes.

Every format Pillow registers is put in one group below (``DECODED_FORMATS``,
``UNSUPPORTED_FORMATS``, ``IGNORED_FORMATS``; a test checks that against the installed Pillow, so
an upgrade that adds a plugin asks for a decision). The signatures are Pillow's own (each
plugin's registered ``_accept``), tightened where Pillow's is weak enough to claim text, and the
extensions are Pillow's ``registered_extensions()``. Decoded: JPEG (and MPO), PNG, GIF, WebP,
BMP, TIFF, ICO, CUR, ICNS, DDS, QOI, PCX, PPM/PGM/PBM/PNM/PFM, SGI, TGA, BLP, MSP: raster image
files that Pillow reads with its own code (no external program, no library its wheels might
lack), each tested on a file Pillow wrote. TGA has no leading signature: it is listed by
extension and recognised by the ``TRUEVISION-XFILE`` footer that TGA 2 files (and Pillow) write.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from PIL import Image

__all__ = [
    "DECODED_FORMATS",
    "IGNORED_FORMATS",
    "IMAGE_EXTENSIONS",
    "KNOWN_UNSUPPORTED_EXTENSIONS",
    "PIL_FORMATS",
    "TGA_FOOTER",
    "UNSUPPORTED_FORMATS",
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

# Sniffed format -> Pillow format id. Anything sniffed but not in here is "unsupported".
PIL_FORMATS = {name: fid for fid, name in DECODED_FORMATS.items() if fid != "MPO"}


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
TGA_FOOTER = b"TRUEVISION-XFILE.\x00"

_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2"}
_BMP_DIB_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


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
    signature: the decoder looks for ``TGA_FOOTER`` at the end). Recognised but unsupported:
    "heic", "heif", "avif", "svg", "jp2", "jxl", "psd", "cr2", "cr3", "orf", "rw2", "raf", and
    "sun", "dcx", "xpm", "ftex", "pixar", "fli". 64 bytes are enough for every binary format
    (Pillow's signatures need 16); more only helps an SVG with a long XML prolog. TIFF-based
    raws (NEF, ARW, DNG) are indistinguishable from TIFF here and report "tiff".
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
