"""The streamed listing: pages equal the old full listing, they are fetched lazily, and the embed
stage consumes them as a stream (parts cut across pages and blocks)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semclust import runner, storage
from semclust.embed import stage
from semclust.embed.formats import is_image_candidate
from semclust.embed.sources import IdSet, InputStream, isin_sorted, read_image_bytes
from tests.embed.files import tar_bytes


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tree_files(n_dirs: int = 6, tricky: bool = True) -> dict[str, bytes]:
    """Relative path -> bytes: images by extension and by content only, text files, hidden
    files, and (``tricky``) names whose sort order differs from a naive walk (``a/``, ``a-x/``,
    ``a.jpg``: ``-`` and ``.`` sort before ``/``)."""
    files: dict[str, bytes] = {}
    seed = 0
    for d in range(n_dirs):
        for f in range(5):
            files[f"d{d:02d}/img{f}.jpg"] = _jpeg(seed := seed + 1)
        files[f"d{d:02d}/noext{d}"] = _jpeg(seed := seed + 1)  # an image found by its content
        files[f"d{d:02d}/notes{d}.txt"] = b"not an image"
    if tricky:
        files.update({"a/x.jpg": _jpeg(101), "a-x/y.jpg": _jpeg(102), "a.jpg": _jpeg(103)})
    files.update(
        {
            "a0/sub/z.png": _jpeg(104),
            "README": b"plain text, sniffed and skipped",
            ".hidden/h.jpg": _jpeg(105),
            "d00/.h.jpg": _jpeg(106),
            "empty.png": b"",
        }
    )
    return files


def _old_listing(input_uri: str) -> tuple[list[str], int]:
    """The listing as it was built before streaming: the full file list, images by extension
    or content, sorted."""
    uris, skipped = [], 0
    for uri, size in storage.list_files(input_uri):
        head = b""
        if not is_image_candidate(uri) and size > 0:
            head = storage.read_bytes(uri)[:64]
        if is_image_candidate(uri, head):
            uris.append(uri)
        else:
            skipped += 1
    return sorted(uris), skipped


def _consume(stream: InputStream) -> list[str]:
    return [u for page in stream.pages() for u in page.column("uri").to_pylist()]


# --- folders and prefixes --------------------------------------------------------------------


def test_local_tree_pages_equal_the_full_listing(tmp_path):
    for rel, data in _tree_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    expected, skipped = _old_listing(str(tmp_path))
    stream = InputStream(str(tmp_path), page_size=4)
    pages = list(stream.pages())
    got = [u for p in pages for u in p.column("uri").to_pylist()]
    assert got == expected and len(got) == 6 * 6 + 5
    assert stream.skipped == skipped == 6 + 1  # the .txt files and README; hidden ones unlisted
    assert stream.listed == len(expected) and stream.duplicates == 0 and stream.done
    assert stream.pages_yielded == len(pages) > 5
    ids = np.concatenate([p.column("image_id").to_numpy() for p in pages])
    assert ids.tolist() == [storage.image_id_for(u) for u in expected]
    np.testing.assert_array_equal(stream.listed_ids(), np.sort(ids))
    assert all(p.column("offset").to_pylist() == [-1] * p.num_rows for p in pages)


def test_local_tree_is_walked_lazily(tmp_path, monkeypatch):
    for d in range(40):
        (tmp_path / f"d{d:02d}").mkdir()
        for f in range(5):
            (tmp_path / f"d{d:02d}" / f"{f}.jpg").write_bytes(b"x")
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scanned.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    pages = InputStream(str(tmp_path), page_size=5).pages()
    first = next(pages)
    assert first.column("uri").to_pylist()[0].endswith("/d00/0.jpg")
    assert len(scanned) == 2  # the root and its first folder, not the 40 folders
    assert sum(p.num_rows for p in pages) == 195
    assert len(scanned) == 41


def test_s3_prefix_is_paged_lazily_and_equals_the_full_listing(s3_server, s3_bucket):
    client = s3_server.client()
    # SeaweedFS lists a prefix folder by folder with names sorted within a folder, not in S3's
    # binary key order, so the names whose order differs between the two are left out here.
    files = _tree_files(n_dirs=5, tricky=False)
    for rel, data in files.items():
        client.put_object(Bucket=s3_bucket, Key=f"imgs/{rel}", Body=data)
    client.put_object(Bucket=s3_bucket, Key="imgs/folder-marker/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="imgs2/not-under-the-prefix.jpg", Body=_jpeg(7))
    prefix = f"s3://{s3_bucket}/imgs"
    expected, skipped = _old_listing(prefix)
    calls: list[int] = []  # keys per ListObjectsV2 response
    lister = storage.s3_list_client()
    lister.meta.events.register(
        "after-call.s3.ListObjectsV2",
        lambda parsed, **_: calls.append(len(parsed.get("Contents", []))),
    )
    stream = InputStream(prefix, page_size=7, s3_client=lister)
    pages = stream.pages()
    first = next(pages)
    # One page asked for: one request, or two when hidden keys thinned the first response.
    assert calls in ([7], [7, 7])
    got = first.column("uri").to_pylist() + [u for p in pages for u in p.column("uri").to_pylist()]
    assert got == expected
    assert stream.skipped == skipped
    assert sum(calls) >= len(files) and len(calls) == -(-sum(calls) // 7) >= 6
    assert all(n == 7 for n in calls[:-1])
    # The bucket's root lists the other prefix too; a single object lists as itself.
    everything = [
        u for p in storage.iter_file_pages(f"s3://{s3_bucket}") for u in p["uri"].to_pylist()
    ]
    assert len(everything) == len(got) + stream.skipped + 1
    assert everything[-1].endswith("not-under-the-prefix.jpg")
    single = list(storage.iter_file_pages(f"{prefix}/README"))
    assert single[0].column("uri").to_pylist() == [f"{prefix}/README"]


def test_s3_listing_errors_carry_no_credentials(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="p/a.jpg", Body=_jpeg(1))
    os.environ["SEMCLUST_TEST_SAVED_SECRET"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    try:
        os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-for-listing"
        bad = storage.s3_list_client()
        with pytest.raises(ValueError, match="cannot access") as err:
            list(storage.iter_file_pages(f"s3://{s3_bucket}/p", s3_client=bad))
        assert "wrong-secret-for-listing" not in str(err.value)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = os.environ.pop("SEMCLUST_TEST_SAVED_SECRET")


# --- manifests and tar shards ----------------------------------------------------------------


def test_manifests_stream_in_batches_with_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"img{i:03d}.jpg" for i in range(50)]
    rows = names + [names[i] for i in rng.integers(0, 50, 20)]  # 20 repeats
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows[5] = str(tmp_path / rows[5])  # absolute and relative forms of paths mix
    with_gaps = [*rows[:30], None, "", *rows[30:]]
    pq.write_table(pa.table({"uri": with_gaps, "label": list(range(72))}), tmp_path / "m.parquet")
    csv_lines = ["uri,label", *(f"{u or ''},{i}" for i, u in enumerate(with_gaps))]
    (tmp_path / "m.csv").write_text("\n".join(csv_lines) + "\n")
    # The old listing: every distinct canonical URI once.
    canon = {f"file://{tmp_path}/{Path(u).name}" for u in rows}
    for manifest in ("m.parquet", "m.csv"):
        stream = InputStream(str(tmp_path / manifest), page_size=8)
        got = _consume(stream)
        assert len(got) == len(set(got)) == 50 and set(got) == canon, manifest
        assert stream.duplicates == 20 and stream.skipped == 2, manifest
        # In the manifest's own order: each URI where it first appears.
        first_seen = list(dict.fromkeys(f"file://{tmp_path}/{Path(u).name}" for u in rows))
        assert got == first_seen
        assert stream.pages_yielded > 1


def test_tar_shards_stream_tar_by_tar(tmp_path):
    blobs = {i: _jpeg(i) for i in range(12)}
    (tmp_path / "s-001.tar").write_bytes(
        tar_bytes({f"k{i:02d}.jpg": blobs[i] for i in range(6, 12)} | {"k06.cls": b"1"})
    )
    (tmp_path / "s-000.tar").write_bytes(
        tar_bytes(
            {f"z/k{i:02d}.png": blobs[i] for i in (3, 1, 2)} | {"k0.json": b"{}", "k00.jpg": b""}
        )
    )
    stream = InputStream(str(tmp_path), page_size=2)
    pages = list(stream.pages())
    table = pa.concat_tables(pages)
    uris = table.column("uri").to_pylist()
    assert uris == sorted(uris) and len(uris) == 10
    assert uris[0] == f"file://{tmp_path}/s-000.tar#k00.jpg"
    assert stream.skipped == 2  # the .cls and .json side files
    offsets, sizes = table["offset"].to_pylist(), table["size"].to_pylist()
    for uri, off, size in zip(uris, offsets, sizes, strict=True):
        data = read_image_bytes(uri, off, size)
        i = int(uri.rsplit("k", 1)[1][:2])
        assert data == (b"" if uri.endswith("#k00.jpg") else blobs[i])
    # Loose images beside tar shards: the tars are ignored, as before.
    (tmp_path / "loose.jpg").write_bytes(blobs[0])
    assert _consume(InputStream(str(tmp_path))) == [f"file://{tmp_path}/loose.jpg"]


# --- compact id sets -------------------------------------------------------------------------


def test_id_set_matches_a_python_set():
    rng = np.random.default_rng(0)
    ids, seen = IdSet(), set()
    for _ in range(200):
        batch = rng.integers(0, 5000, rng.integers(0, 60))
        mask = ids.add_new(batch)
        expected = []
        for v in batch.tolist():
            expected.append(v not in seen)
            seen.add(v)
        assert mask.tolist() == expected
    assert ids.sorted().tolist() == sorted(seen) and len(ids) == len(seen)
    assert isin_sorted(np.array([1, 2, 3]), np.array([2, 5])).tolist() == [False, True, False]


# --- the embed stage on a stream -------------------------------------------------------------


@pytest.mark.slow
def test_embed_streams_pages_into_parts_across_page_boundaries(
    ray_local, demo_images, tmp_path, monkeypatch
):
    from semclust.config import load_config

    # Small pages: parts (10 rows) straddle pages (7 files), and the model's batches (8) do not
    # divide a part.
    monkeypatch.setattr(stage, "LIST_PAGE_SIZE", 7)
    run_dir = str(tmp_path / "run")
    cfg = load_config(
        None,
        {
            "run_dir": run_dir,
            "embed.input": str(demo_images),
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": "default",
            "embed.rows_per_part": 10,
            "embed.batch_size": 8,
        },
    )
    record = runner.run_stages(cfg, ["embed"])["embed"]
    assert (record["listed"], record["embedded"], record["failed"]) == (75, 72, 3)
    assert record["skipped_non_image"] == 1 and record["processed_this_run"] == 75
    assert record["listing_pages"] >= 75 // 7 and record["stale_rows"] == 0
    # The workers wrote the parts: the driver received commit records, not embeddings (a
    # 1280-d embedding alone is 5 KB).
    assert record["parts_this_run"] == 8 and 0 < record["driver_bytes_per_image"] < 100
    assert not storage.exists(storage.join(run_dir, "embed-todo"))  # the to-do list is gone
    shards = storage.list_shards(storage.join(run_dir, "embeddings"))
    assert len(shards) == 8
    ids = np.concatenate(
        [storage.read_parquet(s, ["image_id"])["image_id"].to_numpy() for s in shards]
    )
    failures = storage.list_shards(storage.join(run_dir, "failures"))
    fail_uris = [u for f in failures for u in storage.read_parquet(f, ["uri"])["uri"].to_pylist()]
    everything = np.concatenate([ids, [storage.image_id_for(u) for u in fail_uris]])
    assert len(np.unique(everything)) == len(everything) == 75
    # Parts in listing order: part k holds the k-th ten images of the sorted listing.
    expected, _ = _old_listing(str(demo_images))
    part3 = storage.read_parquet(shards[3], ["uri"])["uri"].to_pylist()
    part3 += [
        u
        for f in failures
        if f.endswith("part-00003.parquet")
        for u in storage.read_parquet(f, ["uri"])["uri"].to_pylist()
    ]
    assert sorted(part3) == expected[30:40]

    # A second run finds everything committed: no Ray work, same counts.
    again = runner.run_stages(cfg, ["embed"])["embed"]
    assert again["processed_this_run"] == 0 and again["already_committed"] == 75
    assert (again["listed"], again["embedded"], again["failed"]) == (75, 72, 3)
