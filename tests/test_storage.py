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
