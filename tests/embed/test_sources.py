"""Input sources: folders, manifests and WebDataset-style tar shards, locally and on S3."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semclust.embed.decode import decode_image
from semclust.embed.sources import list_inputs, read_image_bytes, tar_member_parts
from tests.embed.files import tar_bytes


def _jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def test_folder_listing_by_extension_and_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(_jpeg((255, 0, 0)))
    (tmp_path / "a" / "no_extension").write_bytes(_jpeg((0, 255, 0)))
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / "broken.png").write_bytes(b"")
    listing = list_inputs(str(tmp_path))
    assert [u.rsplit("/", 1)[1] for u in listing.uris] == ["broken.png", "no_extension", "x.jpg"]
    assert listing.skipped == 1


def test_manifest_parquet_and_csv(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(_jpeg((1, 2, 3)))
    pq.write_table(
        pa.table({"uri": ["a.jpg", str(tmp_path / "b.jpg"), "a.jpg", None]}), tmp_path / "m.parquet"
    )
    listing = list_inputs(str(tmp_path / "m.parquet"))
    assert listing.uris == [f"file://{tmp_path}/a.jpg", f"file://{tmp_path}/b.jpg"]
    assert listing.duplicates == 1 and listing.skipped == 1
    (tmp_path / "m.csv").write_text("uri,label\nb.jpg,cat\nmissing.jpg,dog\n")
    assert list_inputs(str(tmp_path / "m.csv")).uris == [
        f"file://{tmp_path}/b.jpg",
        f"file://{tmp_path}/missing.jpg",  # listed: it will be a failures/ row, not dropped
    ]
    (tmp_path / "bad.csv").write_text("path\nb.jpg\n")
    with pytest.raises(ValueError, match="needs a 'uri' column"):
        list_inputs(str(tmp_path / "bad.csv"))


def test_tar_members_read_by_byte_range(tmp_path):
    red, blue = _jpeg((255, 0, 0)), _jpeg((0, 0, 255))
    (tmp_path / "shard-000.tar").write_bytes(
        tar_bytes({"k1.jpg": red, "k1.cls": b"3", "k2.jpg": blue})
    )
    (tmp_path / "shard-001.tar").write_bytes(tar_bytes({"dir/k3.png": red}))
    listing = list_inputs(str(tmp_path))
    assert listing.uris == [
        f"file://{tmp_path}/shard-000.tar#k1.jpg",
        f"file://{tmp_path}/shard-000.tar#k2.jpg",
        f"file://{tmp_path}/shard-001.tar#dir/k3.png",
    ]
    assert listing.skipped == 1  # the .cls side file
    data = read_image_bytes(listing.uris[1], listing.offsets[1], listing.sizes[1])
    assert data == blue
    assert decode_image(data, 32).pixels[0, 0, 2] > 200


def test_sources_on_s3(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="img/a.jpg", Body=_jpeg((9, 9, 9)))
    client.put_object(Bucket=s3_bucket, Key="img/sub/b.webp", Body=_jpeg((9, 9, 9)))
    client.put_object(
        Bucket=s3_bucket, Key="shards/s0.tar", Body=tar_bytes({"x.jpg": _jpeg((0, 9, 0))})
    )
    client.put_object(Bucket=s3_bucket, Key="m.csv", Body=b"uri\nimg/a.jpg\n")
    assert list_inputs(f"s3://{s3_bucket}/img").uris == [
        f"s3://{s3_bucket}/img/a.jpg",
        f"s3://{s3_bucket}/img/sub/b.webp",
    ]
    assert list_inputs(f"s3://{s3_bucket}/m.csv").uris == [f"s3://{s3_bucket}/img/a.jpg"]
    tars = list_inputs(f"s3://{s3_bucket}/shards/s0.tar")
    assert read_image_bytes(tars.uris[0], tars.offsets[0], tars.sizes[0]) == _jpeg((0, 9, 0))


def test_tar_shards_with_hash_in_their_own_names(tmp_path):
    """``<tar URI>#<member>``: the split is at the '#' after the tar suffix, wherever else '#'
    appears; a tar named ``x.tar#y.tar`` beside an ``x.tar`` is told apart by the member's
    header just before its bytes."""
    blobs = {n: _jpeg((i * 40, 0, 0)) for i, n in enumerate(("a#b.jpg", "q?.jpg", "%20 x.jpg"))}
    (tmp_path / "shard#1 %20.tar").write_bytes(tar_bytes(blobs))
    listing = list_inputs(str(tmp_path))
    assert listing.uris == sorted(f"file://{tmp_path}/shard#1 %20.tar#{n}" for n in blobs)
    for uri, off, size in zip(listing.uris, listing.offsets, listing.sizes, strict=True):
        tar_uri, member = tar_member_parts(uri)
        assert tar_uri == f"file://{tmp_path}/shard#1 %20.tar"
        assert read_image_bytes(uri, off, size) == blobs[member]

    # x.tar#y.tar holds m.jpg, and x.tar holds a member named y.tar#m.jpg: the same URI.
    other = tmp_path / "other"
    other.mkdir()
    inner, outer = _jpeg((0, 200, 0)), _jpeg((0, 0, 200))  # the same size: names decide
    (other / "x.tar#y.tar").write_bytes(tar_bytes({"m.jpg": inner}))
    (other / "x.tar").write_bytes(tar_bytes({"pad.jpg": outer, "y.tar#m.jpg": outer}))
    a = list_inputs(f"file://{other}/x.tar#y.tar")
    b = list_inputs(f"file://{other}/x.tar")
    uri = f"file://{other}/x.tar#y.tar#m.jpg"
    assert a.uris == [uri] and b.uris[1] == uri
    assert read_image_bytes(uri, a.offsets[0], a.sizes[0]) == inner
    assert read_image_bytes(uri, b.offsets[1], b.sizes[1]) == outer
    assert tar_member_parts(uri, a.offsets[0], a.sizes[0]) == (
        f"file://{other}/x.tar#y.tar",
        "m.jpg",
    )
    assert tar_member_parts(uri, b.offsets[1], b.sizes[1]) == (
        f"file://{other}/x.tar",
        "y.tar#m.jpg",
    )
    # Sizes alone tell them apart too: a header for another size is no evidence.
    big = _jpeg((0, 200, 0), 96)
    (other / "x.tar#y.tar").write_bytes(tar_bytes({"m" * 120 + ".jpg": big}))
    c = list_inputs(f"file://{other}/x.tar#y.tar")
    assert read_image_bytes(c.uris[0], c.offsets[0], c.sizes[0]) == big
    with pytest.raises(ValueError, match="not a tar member URI"):
        tar_member_parts(f"file://{other}/plain#1.jpg")


def test_unreadable_tar_shard_is_listed_as_itself(tmp_path):
    (tmp_path / "s0.tar").write_bytes(tar_bytes({"k.jpg": _jpeg((1, 2, 3))}))
    (tmp_path / "s1.tar").symlink_to(tmp_path / "gone.tar")
    listing = list_inputs(str(tmp_path))
    assert listing.uris == [f"file://{tmp_path}/s0.tar#k.jpg", f"file://{tmp_path}/s1.tar"]
    assert listing.offsets[1] == -1
    with pytest.raises(FileNotFoundError):
        read_image_bytes(listing.uris[1], -1, -1)
