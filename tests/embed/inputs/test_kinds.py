"""Input kinds: each input is listed by the first registered kind that matches it, and a new
kind is one module plus one line in ``semclust.registry.INPUT_KINDS``."""

from __future__ import annotations

import io
import sys
import textwrap

from PIL import Image

from semclust import registry
from semclust.embed.sources import input_kind, list_inputs
from tests.embed.files import tar_bytes


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def test_each_input_is_listed_by_its_kind(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg(1))
    (tmp_path / "m.csv").write_text("uri\nimgs/a.jpg\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s.tar").write_bytes(tar_bytes({"k.jpg": _jpeg(2), "k.cls": b"1"}))
    for folder in ("d.csv", "d.tar"):  # folders named like a manifest or a tar
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "b.jpg").write_bytes(_jpeg(3))
    kind = {name: registry.input_kind(name) for name in registry.INPUT_KINDS}
    assert input_kind(str(tmp_path / "m.csv")) is kind["manifest"]
    assert input_kind(str(tmp_path / "shards" / "s.tar")) is kind["tar"]
    for folder in ("imgs", "d.csv", "d.tar", "shards"):
        assert input_kind(str(tmp_path / folder)) is kind["tree"], folder
    assert list_inputs(str(tmp_path / "d.tar")).uris == [f"file://{tmp_path}/d.tar/b.jpg"]
    # One tar alone lists as it does in a folder of tars: its image members, side files skipped.
    alone = list_inputs(str(tmp_path / "shards" / "s.tar"))
    in_folder = list_inputs(str(tmp_path / "shards"))
    assert alone == in_folder and alone.uris == [f"file://{tmp_path}/shards/s.tar#k.jpg"]
    assert alone.skipped == 1


_TEXT_LIST_KIND = '''
"""A plain-text list of image paths, one per line (a kind made by the test)."""

from semclust import storage
from semclust.embed.sources import listing_page


def matches(uri):
    return uri.endswith(".lst") and not storage.is_dir(uri)


def pages(stream, uri):
    lines = storage.read_bytes(uri).decode().splitlines()
    for start in range(0, len(lines), stream.page_size):
        chunk = lines[start : start + stream.page_size]
        yield listing_page([storage.canonical_uri(line) for line in chunk if line])
        stream.skipped += sum(1 for line in chunk if not line)
'''


def test_a_new_input_kind_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "kinds").mkdir()
    (tmp_path / "kinds" / "semclust_test_text_list.py").write_text(textwrap.dedent(_TEXT_LIST_KIND))
    monkeypatch.syspath_prepend(str(tmp_path / "kinds"))
    monkeypatch.setattr(
        registry, "INPUT_KINDS", {"text_list": "semclust_test_text_list", **registry.INPUT_KINDS}
    )
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(_jpeg(i))
    listing = tmp_path / "images.lst"
    listing.write_text("\n".join([str(paths[2]), "", str(paths[0]), str(paths[2])]) + "\n")
    try:
        got = list_inputs(str(listing))
    finally:
        sys.modules.pop("semclust_test_text_list", None)
    # In the list's order, the repeat once, the empty line skipped: InputStream's own counts.
    assert got.uris == [f"file://{paths[2]}", f"file://{paths[0]}"]
    assert (got.duplicates, got.skipped) == (1, 1)
