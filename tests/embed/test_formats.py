"""Tests for semclust.embed.formats: what is an image by name and by content, against the
installed Pillow; every input is built here with Pillow/numpy (seeded)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from semclust.embed.decode import decode_image
from semclust.embed.formats import (
    DECODED_FORMATS,
    IGNORED_FORMATS,
    IMAGE_EXTENSIONS,
    KNOWN_UNSUPPORTED_EXTENSIONS,
    UNSUPPORTED_FORMATS,
    is_image_candidate,
    sniff_image_format,
)
from tests.embed.pictures import (
    BLUE,
    FAKE_AVIF,
    FAKE_HEIC,
    RED,
    SVG,
    TEXT,
    WHITE,
    close_to,
    encode,
    left_right,
    reason,
    solid,
)

# ---------------------------------------------------------------------------------------------
# sniffing and listing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [(f, f.lower()) for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")],
)
def test_sniff_supported_formats(fmt: str, expected: str) -> None:
    data = encode(solid(RED), fmt)
    assert sniff_image_format(data[:64]) == expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (FAKE_HEIC, "heic"),
        (FAKE_AVIF, "avif"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "heic"),
        (SVG, "svg"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "svg"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 ", "jp2"),
        (b"8BPS\x00\x01" + b"\x00" * 20, "psd"),
        (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "cr2"),
        (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", "cr3"),
    ],
)
def test_sniff_unsupported_formats(head: bytes, expected: str) -> None:
    assert sniff_image_format(head[:64]) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"",
        TEXT,
        b"BM is also how this text file starts, but it has no DIB header",
        b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2mp41",  # an mp4 video
        b"<?xml version='1.0'?><catalog><book/></catalog>",
        b"%PDF-1.7\n",
        np.random.default_rng(7).integers(0, 256, 64, dtype=np.uint8).tobytes(),
    ],
)
def test_sniff_non_images(head: bytes) -> None:
    assert sniff_image_format(head) is None


def test_is_image_candidate() -> None:
    jpeg_head = encode(solid(RED), "JPEG")[:64]
    # JPEG without (or with a misleading) extension is found by content
    assert is_image_candidate("s3://bucket/photos/IMG_0001", jpeg_head)
    assert is_image_candidate("uploads/photo.bin", jpeg_head)
    # a text file is not an image, with or without a head
    assert not is_image_candidate("notes.txt", TEXT[:64])
    assert not is_image_candidate("notes.txt")
    assert not is_image_candidate("dir.jpg/notes.txt", TEXT[:64])
    # no head and unknown extension -> False (cannot know)
    assert not is_image_candidate("s3://bucket/photos/IMG_0001")
    # known extensions are listed without looking at content (case-insensitive), so a corrupt
    # .jpg or an .heic still gets a failure row instead of vanishing
    assert is_image_candidate("a/B.JPG")
    assert is_image_candidate("a/b.jpeg", TEXT[:64])
    assert is_image_candidate("IMG_1234.HEIC")
    assert is_image_candidate("logo.svg")
    assert is_image_candidate("scan.data", FAKE_HEIC[:64])


def test_extension_sets_are_disjoint_and_sane() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert {".ico", ".cur", ".icns", ".dds", ".qoi", ".pcx", ".ppm", ".pgm", ".sgi", ".tga"} <= (
        IMAGE_EXTENSIONS
    )
    assert not IMAGE_EXTENSIONS & KNOWN_UNSUPPORTED_EXTENSIONS
    assert {".heic", ".heif", ".avif", ".svg", ".jp2", ".psd", ".raw", ".cr2", ".nef"} <= (
        KNOWN_UNSUPPORTED_EXTENSIONS
    )
    assert all(e.startswith(".") and e == e.lower() for e in KNOWN_UNSUPPORTED_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# what is an image by content: Pillow's formats
# ---------------------------------------------------------------------------------------------


def test_every_pillow_format_has_a_decision() -> None:
    """A Pillow upgrade that registers a new format fails here until it is put in one group."""
    Image.init()
    groups = [set(DECODED_FORMATS), set(UNSUPPORTED_FORMATS), set(IGNORED_FORMATS)]
    assert set(Image.OPEN) <= set().union(*groups), set(Image.OPEN) - set().union(*groups)
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2])
    assert not (groups[1] & groups[2])
    # Every decoded format is listed by at least one extension, from Pillow's own registry.
    registered = Image.registered_extensions()
    for fid in DECODED_FORMATS:
        assert any(registered[e] == fid for e in IMAGE_EXTENSIONS if e in registered), fid
    assert not IMAGE_EXTENSIONS & KNOWN_UNSUPPORTED_EXTENSIONS


def _cur(im: Image.Image) -> bytes:
    """A .cur file: Pillow writes icons but not cursors, and a cursor is an icon with type 2
    (and a hotspot where an icon has planes and bit count, which readers ignore)."""
    data = bytearray(encode(im, "ICO", bitmap_format="bmp", sizes=[im.size]))
    data[2:4] = b"\x02\x00"
    return bytes(data)


# Pillow format -> (file of a 64x32 red|blue image written by Pillow, the sniffed name, the
# decoded size); None as the name: no leading signature (TGA).
def _pillow_files() -> dict[str, tuple[bytes, str | None, tuple[int, int]]]:
    rb = left_right(64, 32, RED, BLUE)
    square = left_right(64, 64, RED, BLUE)
    return {
        "ICO": (encode(rb, "ICO", sizes=[(64, 32)]), "ico", (64, 32)),
        "ICO-bmp": (encode(rb, "ICO", bitmap_format="bmp", sizes=[(64, 32)]), "ico", (64, 32)),
        "CUR": (_cur(square), "cur", (64, 64)),
        "ICNS": (encode(square, "ICNS"), "icns", None),  # Pillow writes every icon size
        "DDS": (encode(rb, "DDS"), "dds", (64, 32)),
        "QOI": (encode(rb, "QOI"), "qoi", (64, 32)),
        "PCX": (encode(rb, "PCX"), "pcx", (64, 32)),
        "PPM": (encode(rb, "PPM"), "ppm", (64, 32)),
        "PGM": (encode(rb.convert("L"), "PPM"), "ppm", (64, 32)),
        "PBM": (
            encode(rb.convert("L").point(lambda v: 255 * (v > 60)).convert("1"), "PPM"),
            "ppm",
            (64, 32),
        ),
        "SGI": (encode(rb, "SGI"), "sgi", (64, 32)),
        "TGA": (encode(rb, "TGA"), None, (64, 32)),
        "BLP": (encode(rb.convert("P"), "BLP"), "blp", (64, 32)),
        "MSP": (
            encode(rb.convert("L").point(lambda v: 255 * (v > 60)).convert("1"), "MSP"),
            "msp",
            (64, 32),
        ),
    }


@pytest.mark.parametrize("kind", list(_pillow_files()))
def test_pillow_formats_are_found_by_content_and_decoded(kind: str) -> None:
    data, name, size = _pillow_files()[kind]
    head = data[:64]
    assert sniff_image_format(head) == name
    # Found without an extension (sniffed), and listed by its extension.
    assert is_image_candidate("uploads/no-extension", head) is (name is not None)
    ext = {"ICO-bmp": "ico", "PGM": "pgm", "PBM": "pbm"}.get(kind, kind.lower())
    assert is_image_candidate(f"a/b.{ext}")
    got = decode_image(data, 32, resize="squash")
    if size is not None:
        assert (got.width, got.height) == size
    else:  # ICNS: the largest icon of the set Pillow wrote
        assert got.width == got.height >= 64
    left, right = got.pixels[16, 3], got.pixels[16, 28]
    if kind == "PGM":  # luma of red 76, of blue 29
        assert close_to(left, (76, 76, 76), 2) and close_to(right, (29, 29, 29), 2)
    elif kind in ("PBM", "MSP"):  # bilevel: red above the threshold, blue below
        assert close_to(left, WHITE, 0) and close_to(right, (0, 0, 0), 0)
    else:
        assert close_to(left, RED, tol=40) and close_to(right, BLUE, tol=40), (left, right)


def test_tga_without_its_footer_is_not_recognised() -> None:
    """TGA 1 has no signature at all: listed by extension, it fails with a reason."""
    data = encode(left_right(64, 32, RED, BLUE), "TGA")
    assert data.endswith(b"TRUEVISION-XFILE.\x00")
    assert decode_image(data, 8).width == 64
    assert "not a recognised image format" in reason(data[:-26])


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x59\xa6\x6a\x95" + b"\x00" * 28, "sun"),
        (b"/* XPM */\nstatic char *x[] = {", "xpm"),
        (b"\xb1\x68\xde\x3a" + b"\x00" * 12, "dcx"),
    ],
)
def test_pillow_formats_we_list_but_do_not_decode(head: bytes, expected: str) -> None:
    assert sniff_image_format(head) == expected
    assert is_image_candidate("x/no-extension", head)
    assert reason(head + b"\x00" * 64) == f"unsupported image format: {expected}"


@pytest.mark.parametrize(
    "head",
    [
        b"Python is a programming language\n",  # Pillow's PPM signature is "P" + [0-6fy]
        b"P5-gallery notes\n",
        b"#define WIDTH 16\n#define HEIGHT 16\n",  # XBM's signature is any C header
        b"/* a C comment */\nint x;\n",
        b"(\x00\x00\x00" + b"\x00" * 28,  # DIB's signature is a 4-byte header size
        b"\n\x05" + b"plain",  # PCX needs more than its first two bytes
        b"\x00\x00\x01\x00\x00\x00",  # an icon directory that lists no icon
        b"SIMPLE  =                    T",  # FITS: data, not pictures
        b"%!PS-Adobe-3.0\n",  # PostScript
    ],
)
def test_weak_pillow_signatures_do_not_claim_other_files(head: bytes) -> None:
    assert sniff_image_format(head) is None
    assert not is_image_candidate("notes", head)
