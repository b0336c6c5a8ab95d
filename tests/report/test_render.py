"""Pages without a run: escaping, pagination of 1,000 clusters, paths, the map picture."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from semclust.config import ReportConfig
from semclust.report.build import _write_pages
from semclust.report.collect import Member
from semclust.report.facts import input_root
from semclust.report.findings import ClusterLabel
from semclust.report.map2d import cluster_color, pca_2d, project_2d, render_map
from semclust.report.markup import json_block
from semclust.report.overview import index_page
from semclust.report.paths import PathDisplay
from semclust.report.render import cluster_page, failures_page
from semclust.rundir.labels import FailureSummary
from tests.report.helpers import local_link_target, parse, synthetic_view

HOSTILE = "<script>alert(1)</script>\"' onmouseover=x &amp;"


def test_every_data_string_is_escaped():
    view = synthetic_view(3, 2, ["thumbs/aa/x.jpg"])
    view.clusters[0].label = ClusterLabel(HOSTILE, 1.0, 0.5, 3, HOSTILE)
    member = view.clusters[1].nearest[0]
    member.uri = f"s3://bucket/photos/{HOSTILE}.jpg"
    member.label, member.confidence = HOSTILE, 0.5
    view.thumbs[view.clusters[2].nearest[0].image_id] = (None, HOSTILE)  # a failed thumbnail
    view.metrics = {HOSTILE: {HOSTILE: 1.0}, "table": [{HOSTILE: HOSTILE}]}
    view.failures = FailureSummary(
        1, [(HOSTILE, 1)], [(HOSTILE, HOSTILE, 1)], [(f"s3://b/{HOSTILE}", HOSTILE, HOSTILE)]
    )
    pages = [index_page(view), cluster_page(view, 1), failures_page(view)]
    for html in pages:
        assert "<script>alert" not in html
        assert "' onmouseover" not in html and '" onmouseover' not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27; onmouseover=x &amp;amp;" in html
        tags = parse(html).tags
        assert tags.count("script") == (1 if html is pages[0] else 0)


def test_a_thousand_clusters_are_paged(tmp_path):
    view = synthetic_view(1000, 24, ["thumbs/aa/x.jpg"], per_page=50)
    start = time.perf_counter()
    out = tmp_path / "report"
    pages = _write_pages(str(out), view)
    seconds = time.perf_counter() - start
    assert pages == 20 and seconds < 20
    names = sorted(p.name for p in out.glob("clusters-*.html"))
    assert names == [f"clusters-{p:04d}.html" for p in range(1, 21)]
    for name in (names[0], names[-1]):
        parsed = parse((out / name).read_text())
        sections = [i for i in parsed.ids if i.startswith("c") and i[1:].isdigit()]
        assert len(sections) == 50
        assert len(parsed.images) == 50 * 24
        assert all(im.get("loading") == "lazy" for im in parsed.images)
    index = (out / "index.html").read_text()
    rows = parse(index).rows
    assert len(rows) == 1000
    # Every row links to the page that holds its cluster.
    for row, cv in zip(rows, view.clusters, strict=True):
        assert f'href="clusters-{cv.page:04d}.html#c{cv.cluster}"' in index
        assert int(row["data-rank"]) == cv.rank
    assert len(index) < 1_000_000
    # The pager of a middle page links its neighbours and both ends.
    nav = cluster_page(view, 10)
    for target in (1, 9, 11, 20):
        assert f'href="clusters-{target:04d}.html"' in nav
    for link in parse(nav).links:
        if not link.startswith("data:"):
            local_link_target("clusters-0010.html", link)  # relative, never absolute


def test_json_block_renders_records_and_tables():
    html = json_block(
        {
            "chosen_k": 12,
            "candidates": [{"k": 8, "silhouette": 0.1}, {"k": 12, "silhouette": 0.3}],
        }
    )
    assert html.count("<table") == 2 and "<h3>candidates</h3>" in html
    assert "<td class=n>0.3</td>" in html
    by_method = json_block({"kmeans": {"nmi": 0.91234, "n": 73}, "scan": {"nmi": 0.95}})
    assert by_method.count("<table") == 1 and "<td>kmeans</td>" in by_method


def test_path_display_hides_local_directories_only_when_published():
    local = PathDisplay("/data/in", hide_local=False)
    assert local.uri("file:///data/in/cats/a.jpg") == "cats/a.jpg"
    assert local.uri("file:///other/b.jpg") == "file:///other/b.jpg"
    published = PathDisplay("/data/in", hide_local=True)
    assert published.uri("file:///data/in/cats/a.jpg") == "cats/a.jpg"
    assert published.uri("file:///other/dir/b.jpg") == "…/b.jpg"
    assert published.full("file:///other/dir/b.jpg") == "…/b.jpg"
    assert published.root_caption() == "in"
    message = "read failed: FileNotFoundError: /home/me/x/y.jpg (see file:///tmp/a/b.log)"
    assert published.text(message) == "read failed: FileNotFoundError: …/y.jpg (see …/b.log)"
    # Object-storage URIs and ordinary text are left alone.
    assert published.uri("s3://bucket/a/b.jpg") == "s3://bucket/a/b.jpg"
    assert published.text("1/2 of s3://b/k/x.jpg, n/a") == "1/2 of s3://b/k/x.jpg, n/a"


def test_input_root_prefers_the_configured_input():
    uris = ["file:///d/in/a/1.jpg", "file:///d/in/b/2.jpg"]
    assert input_root({"embed": {"input": "/d/in"}}, uris) == "file:///d/in/"
    assert input_root({"embed": {"input": "/elsewhere"}}, uris) == "file:///d/in/"
    assert input_root({}, ["s3://b/p/x.jpg", "s3://b/q/y.jpg"]) == "s3://b/"
    assert input_root({}, ["s3://a/x.jpg", "s3://b/y.jpg"]) is None
    assert input_root({}, []) is None


def test_pca_2d_matches_the_exact_principal_axes():
    rng = np.random.default_rng(0)
    for n, dim in ((400, 64), (50, 300)):
        x = rng.normal(size=(n, dim)) * np.r_[[6.0, 3.0], np.full(dim - 2, 0.5)]
        xc = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        exact = xc @ vt[:2].T
        got = pca_2d(x.astype(np.float32))
        assert got.shape == (n, 2) and got.dtype == np.float32
        np.testing.assert_allclose(np.abs(got), np.abs(exact), rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got, pca_2d(x.astype(np.float32)))  # deterministic
    assert pca_2d(np.ones((5, 3), np.float32)).tolist() == [[0.0, 0.0]] * 5
    assert project_2d(np.zeros((0, 4), np.float32), "pca", 0)[1] == "none"
    with pytest.raises(ValueError, match="one of auto, pca, umap"):
        project_2d(np.zeros((3, 4), np.float32), "tsne", 0)


def test_render_map_colours_points_by_cluster():
    coords = np.array([[0, 0], [1, 1], [0, 1], [10, 10]], dtype=np.float32)
    clusters = np.array([0, 1, 1, 2])
    png, positions = render_map(coords, clusters, [], width=200, height=150)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape == (150, 200, 3) and positions == {}
    for c in (0, 1, 2):
        # Dots are drawn at alpha 200 over white.
        seen = np.round(np.array(cluster_color(c)) * 200 / 255 + 255 * 55 / 255)
        assert (np.abs(img - seen).sum(axis=2) <= 6).sum() >= 9, c  # a dot, not a stray pixel
    _, positions = render_map(coords, clusters, [1, 2], width=200, height=150)
    assert set(positions) == {1, 2}
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in positions.values())
    assert positions[2][0] > positions[1][0] and positions[2][1] < positions[1][1]  # up right
    assert len({cluster_color(c) for c in range(50)}) == 50


def test_options_are_validated():
    with pytest.raises(ValueError, match="one of auto, pca, umap"):
        ReportConfig(projection="tsne")
    with pytest.raises(ValueError, match="clusters_per_page must be > 0"):
        ReportConfig(clusters_per_page=0)
    with pytest.raises(ValueError, match="nearest must be >= 0"):
        ReportConfig(nearest=-1)


def test_member_without_thumbnail_shows_the_reason():
    view = synthetic_view(1, 2, ["thumbs/aa/x.jpg"])
    m: Member = view.clusters[0].nearest[0]
    view.thumbs[m.image_id] = (None, "OSError: gone")
    html = cluster_page(view, 1)
    assert "no thumbnail: OSError: gone" in html
