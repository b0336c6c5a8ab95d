"""Inputs as users have them: symlinks (to files, to directories, in loops, dangling), entries
that cannot be read, names with every character a filesystem or a key allows, and formats found
only by their content (an icon without an extension). Listed, embedded exactly once, or written
as a ``failures/`` row with stage ``read``: never silently dropped, never a crashed listing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semclust import runinfo, runner, storage
from semclust.embed.sources import InputStream, read_image_bytes

# Names that a URI parser treating '#' as a fragment, '?' as a query, '%' as an escape or ':' as
# a scheme would lose or change. A folder in a name tests the same characters in a directory.
NAMES = [
    "hash#frag.jpg",
    "question?mark.jpg",
    "100%.jpg",
    "pct%41.png",
    "a%20b.jpg",
    "plus+sign.jpg",
    "sp ace.jpg",
    "café – 東京.jpg",
    " lead and trail .jpg",
    "tab\tand\nnewline.jpg",
    "colon:1.jpg",
    "sub dir #2?/inner%2F.jpg",
]
LOCAL_ONLY_NAMES = ["back\\slash.jpg"]  # SeaweedFS turns '\' in a key into '/'


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _icon(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    im.save(buf, "ICO", sizes=[(32, 32)])
    return buf.getvalue()


def _write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _named_files(seed: int, names: list[str]) -> dict[str, bytes]:
    """Relative name -> bytes: the awkward names, an .ico, an icon without an extension, and a
    text file (skipped)."""
    files = {
        name: _image(seed + i, "PNG" if name.endswith(".png") else "JPEG")
        for i, name in enumerate(names)
    }
    files["icon.ico"] = _icon(seed + 100)
    files["favicon"] = _icon(seed + 101)  # found by content only
    return files


def _build_local_tree(root: Path, outside: Path) -> tuple[dict[str, bytes], set[str]]:
    """(URI -> bytes of every image to embed, URIs of every entry that must fail at read)."""
    images: dict[str, bytes] = {}
    r = f"file://{root}"
    for name, data in _named_files(0, NAMES + LOCAL_ONLY_NAMES).items():
        images[f"{r}/{name}"] = _write(root / name, data)
    _write(root / "README.txt", b"not an image")
    _write(root / ".hidden.jpg", _image(50))  # hidden: not listed
    # A real directory and a link to it inside the root: its images once, at their real paths.
    images[f"{r}/real/r0.jpg"] = _write(root / "real" / "r0.jpg", _image(60))
    images[f"{r}/real/r1.png"] = _write(root / "real" / "r1.png", _image(61, "PNG"))
    (root / "alias").symlink_to(root / "real")
    # A directory outside the root, linked twice: followed once, under the first link's name.
    e0 = _write(outside / "ext" / "e0.jpg", _image(70))
    e1 = _write(outside / "ext" / "sub" / "e1.jpg", _image(71))
    (outside / "ext" / "sub" / "again").symlink_to(outside / "ext")  # a loop outside
    (root / "out_a").symlink_to(outside / "ext")
    (root / "out_b").symlink_to(outside / "ext")
    images[f"{r}/out_a/e0.jpg"] = e0
    images[f"{r}/out_a/sub/e1.jpg"] = e1
    # A loop back to the root (today's "Too many levels of symbolic links").
    images[f"{r}/loop/l.jpg"] = _write(root / "loop" / "l.jpg", _image(80))
    (root / "loop" / "back").symlink_to(root)
    # Links to files, inside and outside the root: listed under their own names.
    (root / "file_link.jpg").symlink_to(root / "real" / "r0.jpg")
    images[f"{r}/file_link.jpg"] = images[f"{r}/real/r0.jpg"]
    solo = _write(outside / "solo.jpg", _image(90))
    (root / "solo_link").symlink_to(outside / "solo.jpg")  # no extension: sniffed through it
    images[f"{r}/solo_link"] = solo
    os.mkfifo(root / "pipe.jpg")  # not a file: skipped (opening it would block the reader)
    # Entries that cannot be read: listed whatever their names, then failure rows.
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "dangling_noext").symlink_to(root / "gone")
    (root / "self_loop.jpg").symlink_to(root / "self_loop.jpg")
    with open(os.path.join(os.fsencode(root), b"caf\xe9-latin1.jpg"), "wb") as f:
        f.write(_image(95))  # not UTF-8: cannot be a URI, listed escaped, fails at read
    broken = {
        f"{r}/dangling.jpg",
        f"{r}/dangling_noext",
        f"{r}/self_loop.jpg",
        f"{r}/caf\\xe9-latin1.jpg",
    }
    return images, broken


@pytest.fixture
def awkward_tree(tmp_path) -> tuple[Path, dict[str, bytes], set[str]]:
    root = tmp_path / "in put#1 %20?"
    root.mkdir()
    images, broken = _build_local_tree(root, tmp_path / "outside")
    return root, images, broken


def _listed(input_uri: str) -> tuple[list[str], InputStream]:
    stream = InputStream(input_uri, page_size=5)
    return [u for page in stream.pages() for u in page.column("uri").to_pylist()], stream


def test_awkward_folder_is_listed_completely(awkward_tree):
    root, images, broken = awkward_tree
    uris, stream = _listed(str(root))
    assert uris == sorted(uris)
    assert set(uris) == set(images) | broken and len(uris) == len(set(uris))
    assert stream.skipped == 1  # README.txt
    for uri, data in images.items():
        assert read_image_bytes(uri) == data, uri
    for uri in broken:
        with pytest.raises(OSError):
            read_image_bytes(uri)


# Run in a child process: as root, CAP_DAC_OVERRIDE lets every read through, so the child drops
# it (and CAP_DAC_READ_SEARCH) with capset(2) and is then denied like any user; as another user
# chmod denies by itself.
_CHILD = textwrap.dedent(
    """
    import ctypes, json, os, sys
    import numpy as np

    if os.geteuid() == 0:
        class Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

        libc = ctypes.CDLL(None, use_errno=True)
        hdr, data = Hdr(0x20080522, 0), (Data * 2)()
        ok = libc.capget(ctypes.byref(hdr), data) == 0
        for d in data:
            d.effective &= ~0b110  # CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2)
            d.permitted &= ~0b110
        if not (ok and libc.capset(ctypes.byref(hdr), data) == 0):
            print(json.dumps({"skip": f"capset failed: errno {ctypes.get_errno()}"}))
            sys.exit(0)
    try:
        open(sys.argv[2], "rb").close()
        print(json.dumps({"skip": "a file with mode 000 is still readable here"}))
        sys.exit(0)
    except PermissionError:
        pass

    from semclust.embed.actors import decode_stage
    from semclust.embed.sources import InputStream

    uris = [u for p in InputStream(sys.argv[1]).pages() for u in p.column("uri").to_pylist()]
    n = len(uris)
    batch = {
        "uri": np.asarray(uris, dtype=object),
        "offset": np.full(n, -1),
        "size": np.full(n, -1),
        "part": np.zeros(n, dtype=np.int64),
    }
    out = decode_stage(batch, size=32, resize="squash", max_pixels=10**7)
    print(json.dumps({"rows": [[u, out["error_stage"][i], out["error"][i]]
                               for i, u in enumerate(uris)]}))
    """
)


def test_unreadable_entries_are_failure_rows_with_stage_read(tmp_path):
    """A file without read permission (with and without an image extension), a directory that
    cannot be listed, and one that can be listed but not entered: each is listed and its read
    fails with the OS's reason, as decode_stage (the pipeline's read) writes it."""
    root = tmp_path / "perm"
    _write(root / "ok.jpg", _image(1))
    _write(root / "secret.jpg", _image(2))
    _write(root / "secret_noext", _image(3))
    _write(root / "locked" / "inside.jpg", _image(4))
    _write(root / "no_entry" / "f.jpg", _image(5))
    modes = {"secret.jpg": 0, "secret_noext": 0, "locked": 0, "no_entry": 0o644}
    for name, mode in modes.items():
        os.chmod(root / name, mode)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(root), str(root / "secret.jpg")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for name in modes:
            os.chmod(root / name, 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    rows = {
        uri.removeprefix(f"file://{root}/"): (stage, error) for uri, stage, error in result["rows"]
    }
    assert rows["ok.jpg"] == ("", "")
    for name in ("secret.jpg", "secret_noext"):
        assert rows[name][0] == "read" and "PermissionError" in rows[name][1], rows[name]
    assert rows["locked/"][0] == "read"
    assert "a directory that cannot be listed (PermissionError" in rows["locked/"][1]
    # Listed but not searchable: its entries cannot be stat'ed, so they are listed with size -1.
    assert rows["no_entry/f.jpg"][0] == "read" and "Permission" in rows["no_entry/f.jpg"][1]
    assert set(rows) == {"ok.jpg", "secret.jpg", "secret_noext", "locked/", "no_entry/f.jpg"}


# --- the embed stage on them -----------------------------------------------------------------


def _cfg(input_uri: str, run_dir: str):
    from semclust.config import load_config

    return load_config(
        None,
        {
            "run_dir": run_dir,
            "embed.input": input_uri,
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": "default",
            "embed.image_size": 64,
            "embed.rows_per_part": 10,
            "embed.batch_size": 8,
        },
    )


def _read_run(run_dir: str) -> tuple[dict[str, int], dict[str, tuple[str, str]]]:
    """(uri -> image_id of embeddings/, uri -> (stage, error) of failures/), each URI once."""
    embedded: dict[str, int] = {}
    for shard in storage.list_shards(storage.join(run_dir, "embeddings")):
        t = storage.read_parquet(shard, ["uri", "image_id"])
        for uri, image_id in zip(t["uri"].to_pylist(), t["image_id"].to_pylist(), strict=True):
            assert uri not in embedded, f"{uri!r} embedded twice"
            embedded[uri] = image_id
    failed: dict[str, tuple[str, str]] = {}
    for shard in storage.list_shards(storage.join(run_dir, "failures")):
        t = storage.read_parquet(shard, ["uri", "stage", "error"])
        for uri, stage, error in zip(*t.to_pydict().values(), strict=True):
            assert uri not in failed and uri not in embedded, f"{uri!r} twice"
            failed[uri] = (stage, error)
    return embedded, failed


def _check_run(run_dir: str, record: dict, images: dict[str, bytes], broken: set[str]) -> None:
    embedded, failed = _read_run(run_dir)
    assert set(embedded) == set(images)
    assert set(failed) == broken
    for uri, (stage, error) in failed.items():
        assert stage == "read" and error.startswith("read failed: "), (uri, stage, error)
    for uri, image_id in embedded.items():
        assert image_id == storage.image_id_for(uri)
        assert read_image_bytes(uri) == images[uri], uri  # the URI names the original file
        assert storage.read_bytes(uri) == images[uri], uri
    info = runinfo.load(run_dir)["stages"]["embed"]
    for counts in (record, info):
        assert counts["listed"] == counts["embedded"] + counts["failed"]
        assert (counts["embedded"], counts["failed"]) == (len(images), len(broken))
        assert counts["skipped_non_image"] == 1


@pytest.mark.slow
def test_awkward_folder_embeds_every_image_once(ray_local, awkward_tree, tmp_path, monkeypatch):
    root, images, broken = awkward_tree
    # A directory the listing cannot scan. Root lists every directory, so the driver's scandir
    # is made to refuse this one (test_unreadable_entries_... above does it with real
    # permissions); the worker's read then meets a directory, a failure row.
    _write(root / "locked" / "hidden_by_lock.jpg", _image(7))
    broken.add(f"file://{root}/locked/")
    real_scandir = os.scandir

    def scandir(path):
        if str(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    if os.geteuid() != 0:  # chmod denies a real user: add the unreadable file for real too
        _write(root / "secret.jpg", _image(8))
        os.chmod(root / "secret.jpg", 0)
        broken.add(f"file://{root}/secret.jpg")
    run_dir = str(tmp_path / "run #1")
    record = runner.run_stages(_cfg(str(root), run_dir), ["embed"])["embed"]
    _check_run(run_dir, record, images, broken)


@pytest.mark.slow
def test_awkward_keys_embed_every_image_once(ray_local, s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    prefix = "in put#1 %20?"
    images: dict[str, bytes] = {}
    for name, data in _named_files(200, NAMES).items():
        client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{name}", Body=data)
        images[f"s3://{s3_bucket}/{prefix}/{name}"] = data
    client.put_object(Bucket=s3_bucket, Key=f"{prefix}/README.txt", Body=b"not an image")
    client.put_object(Bucket=s3_bucket, Key=f"{prefix}/.hidden.jpg", Body=_image(9))
    run_dir = str(tmp_path / "run")
    record = runner.run_stages(_cfg(f"s3://{s3_bucket}/{prefix}", run_dir), ["embed"])["embed"]
    _check_run(run_dir, record, images, set())
