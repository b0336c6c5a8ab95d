from __future__ import annotations

import os

import pyarrow as pa
import pytest

from semclust import storage


def test_image_id_is_stable_63_bit_and_distinct():
    a = storage.image_id_for("s3://bucket/a.jpg")
    # A fixed value: the id must not change between releases, or resumes would redo work.
    assert a == storage.image_id_for("s3://bucket/a.jpg")
    assert 0 <= a < 2**63
    ids = {storage.image_id_for(f"file:///x/{i}.jpg") for i in range(20000)}
    assert len(ids) == 20000
    assert storage.image_id_for("file:///x/1.jpg") != storage.image_id_for("file:///x/1.JPG")


def test_image_id_known_value():
    # Pinned so an accidental change of hash or byte order fails loudly.
    import hashlib

    digest = hashlib.blake2b(b"file:///data/cat.jpg", digest_size=8).digest()
    assert storage.image_id_for("file:///data/cat.jpg") == int.from_bytes(digest, "little") & (
        2**63 - 1
    )


def test_canonical_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.canonical_uri("x/y.jpg") == f"file://{tmp_path}/x/y.jpg"
    assert storage.canonical_uri(f"file://{tmp_path}/a") == f"file://{tmp_path}/a"
    assert storage.canonical_uri("s3://b/k") == "s3://b/k"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.canonical_uri("ftp://host/x")


def test_atomic_parquet_write_and_listing(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    storage.write_parquet(str(tmp_path / "d" / "part-00001.parquet"), table)
    storage.write_parquet(str(tmp_path / "d" / "part-00000.parquet"), table)
    (tmp_path / "d" / ".tmp-abc-part-00002.parquet").write_bytes(b"partial")
    shards = storage.list_shards(str(tmp_path / "d"))
    assert [os.path.basename(s) for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.read_parquet(shards[0]).equals(table)
    assert not [n for n in os.listdir(tmp_path / "d") if n.startswith(".tmp") and "abc" not in n]


def test_list_files_skips_hidden_and_reports_missing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.jpg").write_bytes(b"1")
    (tmp_path / ".z.jpg").write_bytes(b"1")
    files = sorted(u for u, _ in storage.list_files(str(tmp_path)))
    assert files == [f"file://{tmp_path}/a/x.jpg"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(storage.list_files(str(tmp_path / "missing")))


def test_run_json_keeps_other_stages_settings(tmp_path):
    from semclust import runinfo
    from semclust.config import load_config

    run = str(tmp_path / "run")
    embed_cfg = load_config(None, {"embed.backbone": "efficientnet_lite0", "embed.input": "/x"})
    runinfo.update_stage(run, "embed", {"listed": 3}, embed_cfg.to_dict())
    cluster_cfg = load_config(None, {"cluster.k": 7})  # embed section at its defaults
    runinfo.update_stage(run, "cluster", {"k": 7}, cluster_cfg.to_dict())
    info = runinfo.load(run)
    assert info["config"]["embed"]["backbone"] == "efficientnet_lite0"
    assert info["config"]["embed"]["input"] == "/x"
    assert info["config"]["cluster"]["k"] == 7
    assert info["stages"] == {"embed": {"listed": 3}, "cluster": {"k": 7}}


# --- URIs: raw, split by hand ----------------------------------------------------------------

AWKWARD_NAMES = [
    "hash#frag.jpg",
    "question?mark.jpg",
    "100%.jpg",
    "pct%41.jpg",
    "a%20b.jpg",
    "plus+sign.jpg",
    "sp ace.jpg",
    "café – 東京.jpg",
    "colon:1.jpg",
    "semi;colon&amp=.jpg",
]


def test_uris_are_raw_never_percent_coded(tmp_path):
    assert storage.split_uri("s3://b/k#x?y") == ("s3", "b/k#x?y")
    assert storage.split_uri("S3://b/k") == ("s3", "b/k")
    assert storage.split_uri("photo:1.jpg") == ("", "photo:1.jpg")  # a file name, not a scheme
    assert storage.split_uri("/x/a://b") == ("", "/x/a://b")
    for name in AWKWARD_NAMES:
        local = str(tmp_path / name)
        assert storage.canonical_uri(local) == "file://" + local
        assert storage.canonical_uri("file://" + local) == "file://" + local
        assert storage.resolve("file://" + local)[1] == local
        assert storage.canonical_uri(f"s3://bucket/p/{name}") == f"s3://bucket/p/{name}"
        assert storage.resolve(f"s3://bucket/p/{name}")[1] == f"bucket/p/{name}"
        assert storage.is_remote(f"s3://bucket/{name}") and not storage.is_remote(local)
        assert storage.join(f"s3://bucket/{name}", "x") == f"s3://bucket/{name}/x"
    assert storage.canonical_uri("file://localhost/tmp/a#b") == "file:///tmp/a#b"
    assert storage.canonical_uri("file:/tmp/a?b") == "file:///tmp/a?b"
    with pytest.raises(ValueError, match="names a host or a relative path"):
        storage.canonical_uri("file://server/share/a.jpg")
    with pytest.raises(ValueError, match="unsupported URI scheme 'http'"):
        storage.canonical_uri("http://host/a.jpg")


def test_plain_names_keep_their_uri_and_id(tmp_path, monkeypatch):
    """Runs made before must resume: for names without special characters canonical_uri gives
    what Path.resolve() gave (symlinks resolved, relative paths made absolute)."""
    from pathlib import Path

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "cat.jpg").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    for p in ("real/cat.jpg", "link/cat.jpg", str(tmp_path / "link" / "cat.jpg"), "~/x.jpg", "."):
        old = "file://" + str(Path(p).expanduser().resolve())
        assert storage.canonical_uri(p) == old
        assert storage.image_id_for(storage.canonical_uri(p)) == storage.image_id_for(old)
    assert storage.canonical_uri(f"file://{tmp_path}/link/cat.jpg") == (
        f"file://{tmp_path}/real/cat.jpg"
    )


def test_awkward_local_names_are_listed_and_read_back(tmp_path):
    for i, name in enumerate(AWKWARD_NAMES):
        (tmp_path / name).write_bytes(name.encode() * (i + 1))
    listed = [u for page in storage.iter_file_pages(str(tmp_path)) for u in page["uri"].to_pylist()]
    assert listed == sorted(f"file://{tmp_path}/{n}" for n in AWKWARD_NAMES)
    assert sorted(u for u, _ in storage.list_files(str(tmp_path))) == listed
    for uri in listed:
        name = uri.rsplit("/", 1)[1]
        assert storage.read_bytes(uri) == (tmp_path / name).read_bytes()
        assert storage.exists(uri) and not storage.is_dir(uri)


# --- local trees as users have them -----------------------------------------------------------


def _walk(root) -> list[tuple[str, int]]:
    rows = [
        (u, s)
        for page in storage.iter_file_pages(str(root), page_size=3)
        for u, s in zip(page["uri"].to_pylist(), page["size"].to_pylist(), strict=True)
    ]
    assert rows == sorted(rows) and [u for u, _ in rows] == sorted({u for u, _ in rows})
    assert sorted(storage.list_files(str(root))) == rows  # one walk for both
    return rows


def test_symlinks_loops_and_broken_entries(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real" / "deep").mkdir(parents=True)
    (root / "real" / "r.jpg").write_bytes(b"r")
    (root / "real" / "deep" / "d.jpg").write_bytes(b"dd")
    (root / "alias").symlink_to(root / "real")  # inside the root: its files once, at real paths
    (root / "real" / "deep" / "up").symlink_to(root)  # a loop back to the root
    (outside / "ext" / "sub").mkdir(parents=True)
    (outside / "ext" / "e.jpg").write_bytes(b"eee")
    (outside / "ext" / "sub" / "s.jpg").write_bytes(b"ssss")
    (outside / "ext" / "sub" / "again").symlink_to(outside / "ext")  # a loop outside the root
    (root / "out_a").symlink_to(outside / "ext")  # outside the root: followed ...
    (root / "out_b").symlink_to(outside / "ext")  # ... once: the first in sorted order
    (root / "file_link.jpg").symlink_to(root / "real" / "r.jpg")  # a file link is its own name
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")  # ELOOP on stat
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.jpg").write_bytes(b"h")
    (root / "to_hidden").symlink_to(root / ".hidden")  # the real dir is never walked: followed
    os.mkfifo(root / "pipe.jpg")  # not a file: skipped (a read would block)
    rows = _walk(root)
    r = f"file://{root}"
    assert rows == [
        (f"{r}/dangling.jpg", -1),
        (f"{r}/file_link.jpg", 1),
        (f"{r}/out_a/e.jpg", 3),
        (f"{r}/out_a/sub/s.jpg", 4),
        (f"{r}/real/deep/d.jpg", 2),
        (f"{r}/real/r.jpg", 1),
        (f"{r}/self.jpg", -1),
        (f"{r}/to_hidden/h.jpg", 1),
    ]
    # Reading a broken entry fails with the OS's reason (a failure row, not a crash).
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{r}/dangling.jpg")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        storage.read_bytes(f"{r}/self.jpg")
    # The root itself given through a link walks the same tree at the same URIs.
    (tmp_path / "root_link").symlink_to(root)
    assert _walk(tmp_path / "root_link") == rows


def test_a_directory_that_cannot_be_scanned_is_listed_as_itself(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.jpg").write_bytes(b"x")
    (tmp_path / "locked-2.jpg").write_bytes(b"y")
    (tmp_path / "z.jpg").write_bytes(b"z")
    real_scandir = os.scandir

    def scandir(path):  # as root chmod cannot deny a listing; test_awkward_inputs does it for real
        if str(path) == str(tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert _walk(tmp_path) == [
        (f"file://{tmp_path}/locked-2.jpg", 1),
        (f"file://{tmp_path}/locked/", -1),  # sorts as a directory, where its files would be
        (f"file://{tmp_path}/z.jpg", 1),
    ]


def test_a_name_that_is_not_utf8_is_listed_escaped(tmp_path):
    os.makedirs(os.path.join(os.fsencode(tmp_path), b"d\xff"))
    with open(os.path.join(os.fsencode(tmp_path), b"d\xff", b"caf\xe9.jpg"), "wb") as f:
        f.write(b"x")
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    rows = _walk(tmp_path)
    assert rows == [(f"file://{tmp_path}/d\\xff/caf\\xe9.jpg", 1), (f"file://{tmp_path}/ok.jpg", 2)]
    with pytest.raises(FileNotFoundError):  # the escaped name is no file: a failure row
        storage.read_bytes(rows[0][0])
