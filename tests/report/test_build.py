"""The report of a small real run: files, content, links, escaping, reuse, object storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semclust.config import ReportConfig
from semclust.report import build_report
from tests.report.helpers import (
    EVIL_FAILURE,
    N_CLASSES,
    PER_CLASS,
    UNLABELLED_CLASS,
    embedded_images,
    local_link_target,
    parse,
    run_report,
)

pytestmark = pytest.mark.slow


def _pages(report_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(report_dir.glob("*.html"))}


def _check_links(pages: dict[str, str], exists) -> None:
    """Every href/src is relative and points at an existing file (and an existing anchor)."""
    parsed = {name: parse(text) for name, text in pages.items()}
    for name, page in parsed.items():
        for link in page.links:
            if link.startswith("data:"):
                continue  # the inline empty favicon
            target, fragment = local_link_target(name, link)
            assert exists(target), f"{name}: {link!r} does not resolve"
            if fragment:
                assert fragment in parsed[target].ids, f"{name}: no #{fragment} in {target}"


def test_report_files_and_every_cluster(built_report, report_run):
    report_dir: Path = built_report["dir"]
    assert built_report["uri"] == f"file://{report_dir}/index.html"
    pages = _pages(report_dir)
    assert {"index.html", "failures.html", "duplicates.html", "clusters-0001.html"} <= set(pages)
    assert (report_dir / "map.png").is_file()

    assignments = pq.read_table(report_run / "assignments").to_pydict()
    sizes = Counter(assignments["cluster"])
    parsed = {name: parse(text) for name, text in pages.items()}

    # Every cluster has a gallery section and a row in the overview table, with its size.
    sections = {i for p in parsed.values() for i in p.ids if i[:1] == "c" and i[1:].isdigit()}
    assert sections == {f"c{c}" for c in range(N_CLASSES)}
    rows = {int(r["data-cluster"]): r for r in parsed["index.html"].rows}
    assert set(rows) == set(range(N_CLASSES))
    assert {c: int(r["data-size"]) for c, r in rows.items()} == {
        c: sizes.get(c, 0) for c in range(N_CLASSES)
    }
    # Review order: the cluster with the largest sum of distances comes first.
    dist_sum = Counter()
    for c, d in zip(assignments["cluster"], assignments["distance"], strict=True):
        dist_sum[c] += d
    first = min(rows.values(), key=lambda r: int(r["data-rank"]))
    assert int(first["data-cluster"]) == max(dist_sum, key=dist_sum.get)

    # "Nearest the centroid" is the smallest-distance members, in order; the random sample is
    # other members of the same cluster.
    galleries = [g for p in parsed.values() for g in p.galleries]
    by_cluster = {}
    for section, kind, ids in galleries:
        by_cluster.setdefault(section, {})[kind] = ids
    distance = dict(zip(assignments["image_id"], assignments["distance"], strict=True))
    cluster_of = dict(zip(assignments["image_id"], assignments["cluster"], strict=True))
    for c in range(N_CLASSES):
        members = sorted(
            (i for i in distance if cluster_of[i] == c), key=lambda i: (distance[i], i)
        )
        shown = by_cluster[f"c{c}"]
        assert shown["nearest"] == members[:12]
        sample = shown.get("sample", [])
        assert len(sample) == min(12, max(0, len(members) - 12))
        assert not set(sample) & set(shown["nearest"])
        assert all(cluster_of[i] == c for i in sample)

    # Every image link resolves; thumbnails are real, small JPEGs.
    _check_links(pages, lambda rel: (report_dir / rel).is_file())
    thumbs = [im["src"] for p in parsed.values() for im in p.images if "thumbs/" in im["src"]]
    assert len(set(thumbs)) == len(assignments["image_id"])  # every image of this small run
    with Image.open(report_dir / thumbs[0]) as im:
        assert im.format == "JPEG" and max(im.size) <= 192

    # Failure reasons are shown; the hostile file names are text, not markup.
    failures = pages["failures.html"]
    for reason in ("empty file", "truncated", "not a recognised image format"):
        assert reason in failures
    assert "_unusable/empty.jpg" in failures
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in failures
    assert EVIL_FAILURE not in failures
    all_html = "\n".join(pages.values())
    assert "<svg" not in all_html and "<img src=x" not in all_html
    assert "&lt;svg onload=alert(2)&gt; &amp; co.jpg" in all_html
    assert "&lt;i&gt;coffee&lt;/i&gt;" in all_html and "<i>coffee</i>" not in all_html
    assert sum(p.scripts for p in parsed.values()) == 1  # the overview's own table script
    assert not {"svg", "iframe", "object"} & {t for p in parsed.values() for t in p.tags}

    # Overview: counts, stage timings, metrics, the k-selection table.
    index = pages["index.html"]
    metrics = json.loads((report_run / "metrics.json").read_text())["kmeans"]
    assert f"{metrics['nmi']:.4g}" in index
    assert "k_selection.json" in index and "silhouette" in index
    for stage in ("embed", "cluster"):
        assert f"<td>{stage}</td>" in index
    assert "efficientnet_lite0" in index  # the embedder really used, not the last config's
    listed = N_CLASSES * PER_CLASS + 1 + 4  # + the extra good image, 4 unusable files
    assert f"listed<b>{listed}</b>" in index and "failed<b>4</b>" in index
    assert "coffee/coffee-000.jpg" in all_html  # captions relative to the input folder

    # Labels: the majority label of each cluster, with its share.
    images = embedded_images(report_run)
    for c in range(N_CLASSES):
        classes = Counter(
            images[i].split("/")[-2]
            for i in cluster_of
            if cluster_of[i] == c and images[i].split("/")[-2] != UNLABELLED_CLASS
        )
        label = rows[c]["data-label"]
        if not classes:
            assert label == ""
            continue
        best = max(classes.values())
        expected = {k for k, v in classes.items() if v == best}
        assert label.replace("<i>coffee</i>", "coffee") in expected

    # Near-duplicate groups: the two real groups, largest first; the lone image is no group.
    dup = parsed["duplicates.html"]
    groups = [(s, ids) for s, kind, ids in dup.galleries if kind == "duplicates"]
    assert [s for s, _ in groups] == ["g7", "g9"]
    assert [len(ids) for _, ids in groups] == [3, 2]

    # The map: a picture with a dot colour per cluster.
    with Image.open(report_dir / "map.png") as im:
        assert im.format == "PNG" and im.size == (1100, 760)
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > N_CLASSES

    record = json.loads((report_run / "run.json").read_text())["stages"]["report"]
    assert record["clusters"] == N_CLASSES and record["thumbnails_failed"] == 0
    assert record["thumbnails_made"] + record["thumbnails_reused"] == record["images_shown"]
    assert record["projection"] in ("PCA", "UMAP")


def test_rebuild_reuses_thumbnails_and_the_folder_is_relocatable(
    built_report, report_run, tmp_path
):
    report_dir: Path = built_report["dir"]
    before = {p: p.stat().st_mtime_ns for p in report_dir.glob("thumbs/*/*.jpg")}
    run_report(report_run)
    record = json.loads((report_run / "run.json").read_text())["stages"]["report"]
    assert record["thumbnails_made"] == 0
    assert record["thumbnails_reused"] == record["images_shown"] == len(before)
    assert {p: p.stat().st_mtime_ns for p in report_dir.glob("thumbs/*/*.jpg")} == before

    moved = tmp_path / "elsewhere"
    shutil.copytree(report_dir, moved)
    _check_links(_pages(moved), lambda rel: (moved / rel).is_file())


def test_fewer_clusters_per_page_paginates_and_drops_stale_pages(report_run, tmp_path):
    # build_report called directly (no stage, no run.json record), with its own Ray tasks.
    out = tmp_path / "paged"
    build_report(str(report_run), ReportConfig(out=str(out), clusters_per_page=5))
    names = sorted(p.name for p in out.glob("clusters-*.html"))
    assert names == ["clusters-0001.html", "clusters-0002.html", "clusters-0003.html"]
    sections = [
        sorted(i for i in parse(p.read_text()).ids if i[:1] == "c" and i[1:].isdigit())
        for p in sorted(out.glob("clusters-*.html"))
    ]
    assert [len(s) for s in sections] == [5, 5, 2]
    assert 'href="clusters-0002.html" rel="next"' in (out / "clusters-0001.html").read_text()
    _check_links(_pages(out), lambda rel: (out / rel).is_file())

    build_report(str(report_run), ReportConfig(out=str(out), clusters_per_page=50))
    assert sorted(p.name for p in out.glob("clusters-*.html")) == ["clusters-0001.html"]


def test_report_written_to_object_storage(report_run, report_images, s3_bucket, tmp_path_factory):
    """Published to S3: no local path leaks into any page, every link resolves to an object,
    and pages are stored as text/html (so that a bucket serves them as web pages)."""
    from semclust import storage

    prefix = f"s3://{s3_bucket}/runs/demo"
    assert run_report(report_run, out=prefix)["uri"] == f"{prefix}/index.html"
    keys = {uri[len(prefix) + 1 :] for uri, _ in storage.list_files(prefix)}
    assert {"index.html", "failures.html", "duplicates.html", "map.png"} <= keys
    fs, root = storage.resolve(prefix)
    pages = {}
    for key in sorted(k for k in keys if k.endswith(".html")):
        with fs.open_input_stream(f"{root}/{key}") as f:
            pages[key] = f.read().decode("utf-8")
            content_type = f.metadata().get("Content-Type", b"")
        assert content_type.startswith(b"text/html"), (key, content_type)
    with fs.open_input_stream(f"{root}/map.png") as f:
        assert f.metadata().get("Content-Type") == b"image/png"
    _check_links(pages, lambda rel: rel in keys)

    local_roots = {str(report_run), str(report_images), str(tmp_path_factory.getbasetemp())}
    for name, text in pages.items():
        assert "file://" not in text, name
        for local in local_roots:
            assert local not in text, (name, local)
    assert "_unusable/&lt;img src=x onerror=alert(1)&gt;.jpg" in pages["failures.html"]
    assert "coffee/&quot;&gt;&lt;svg onload=alert(2)&gt; &amp; co.jpg" in "".join(pages.values())


def test_missing_clusters_is_a_clear_error(report_run, tmp_path, capsys):
    from semclust.cli import main

    assert main(["report", "--run-dir", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err

    partial = tmp_path / "embedded-only"
    shutil.copytree(report_run / "embeddings", partial / "embeddings")
    assert main(["report", "--run-dir", str(partial)]) == 2
    assert "run `semclust cluster`" in capsys.readouterr().err

    proc = subprocess.run(
        [sys.executable, "-m", "semclust.report", "--run-dir", str(partial)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "run `semclust cluster`" in proc.stderr
