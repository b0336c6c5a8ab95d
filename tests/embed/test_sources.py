"""Input sources: folders, manifests and WebDataset-style tar shards, locally and on S3."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semclust import storage
from semclust.embed.decode import decode_image
from semclust.embed.sources import list_inputs, list_tar_shards, read_image_bytes
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
    storage.configure_s3(storage.s3_options_from_env())
    assert list_inputs(f"s3://{s3_bucket}/img").uris == [
        f"s3://{s3_bucket}/img/a.jpg",
        f"s3://{s3_bucket}/img/sub/b.webp",
    ]
    assert list_inputs(f"s3://{s3_bucket}/m.csv").uris == [f"s3://{s3_bucket}/img/a.jpg"]
    tars = list_tar_shards([f"s3://{s3_bucket}/shards/s0.tar"])
    assert read_image_bytes(tars.uris[0], tars.offsets[0], tars.sizes[0]) == _jpeg((0, 9, 0))
