"""The report in a real browser: headless Chromium renders it without errors and shows images.

Screenshots are saved under test-artifacts/ in the repository root.
"""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from semclust.report.build import _write_pages
from tests.report.helpers import EVIL_FAILURE, N_CLASSES, repo_root, synthetic_view

pytestmark = pytest.mark.slow


def test_report_renders_in_chromium(built_report, browser):
    report_dir = built_report["dir"]
    artifacts = repo_root() / "test-artifacts"
    artifacts.mkdir(exist_ok=True)

    browser.navigate(f"file://{report_dir}/index.html")
    assert browser.evaluate("document.title").startswith("Overview")
    rows = "Array.from(document.querySelectorAll('#cluster-table tbody tr'))"
    assert browser.evaluate(f"{rows}.filter(r => !r.hidden).length") == N_CLASSES
    # The table script sorts: by size, largest first, on the first click.
    browser.evaluate("document.querySelector('th[data-key=size]').click()")
    sizes = browser.evaluate(f"{rows}.map(r => Number(r.dataset.size))")
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == N_CLASSES
    # ... and filters: by cluster number.
    browser.evaluate(
        "(() => { const f = document.getElementById('ct-filter'); f.value = '3';"
        " f.dispatchEvent(new Event('input')); })()"
    )
    assert browser.evaluate(f"{rows}.filter(r => !r.hidden).map(r => r.dataset.cluster)") == ["3"]
    assert browser.wait_for(
        "(() => { const m = document.querySelector('.map img');"
        " return m && m.complete && m.naturalWidth > 0; })()"
    )
    browser.screenshot(artifacts / "report-index.png")

    browser.navigate(f"file://{report_dir}/clusters-0001.html")
    # The first gallery image is in view, so lazy loading fetches it: it must decode.
    assert browser.wait_for(
        "(() => { const im = document.querySelector('img.thumb');"
        " return im && im.complete && im.naturalWidth > 0; })()"
    )
    assert browser.evaluate("document.querySelectorAll('section.cluster').length") == N_CLASSES
    broken = browser.evaluate(
        "Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0)"
        ".map(i => i.src)"
    )
    assert broken == []
    browser.screenshot(artifacts / "report-gallery.png")

    browser.navigate(f"file://{report_dir}/failures.html")
    # The hostile file name is on the page as text, and made no element of its own.
    assert EVIL_FAILURE in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelectorAll('main img, main svg').length") == 0
    browser.screenshot(artifacts / "report-failures.png")

    browser.navigate(f"file://{report_dir}/duplicates.html")
    assert browser.wait_for(
        "(() => { const im = document.querySelector('img.thumb');"
        " return im && im.complete && im.naturalWidth > 0; })()"
    )
    assert browser.problems() == []
    assert (artifacts / "report-gallery.png").stat().st_size > 10_000


def test_a_thousand_cluster_report_stays_light_in_chromium(browser, tmp_path):
    """1,000 clusters x 24 images: the overview pages its table, galleries load lazily."""
    out = tmp_path / "report"
    thumbs = []
    for i in range(4):
        rel = f"thumbs/0{i}/{i:016x}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (192, 144), (60 * i, 120, 200 - 40 * i)).save(out / rel, "JPEG")
        thumbs.append(rel)
    view = synthetic_view(1000, 24, thumbs, per_page=50)
    # One file per image of the last page: a browser shares one download between equal URLs.
    for n, m in enumerate(m for c in view.clusters if c.page == 20 for m in c.nearest + c.sample):
        rel = f"thumbs/p20/{n:05d}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (n % 256, 90, 160)).save(out / rel, "JPEG")
        view.thumbs[m.image_id] = (rel, "")
    assert _write_pages(str(out), view) == 20

    start = time.perf_counter()
    browser.navigate(f"file://{out}/index.html")
    index_seconds = time.perf_counter() - start
    visible = "Array.from(document.querySelectorAll('#cluster-table tbody tr'))"
    assert browser.evaluate(f"{visible}.filter(r => !r.hidden).length") == 100
    assert browser.evaluate("document.getElementById('ct-info').textContent") == (
        "rows 1-100 of 1000"
    )
    browser.evaluate("document.getElementById('ct-next').click()")
    assert browser.evaluate("document.getElementById('ct-info').textContent") == (
        "rows 101-200 of 1000"
    )
    browser.evaluate("document.querySelector('th[data-key=size]').click()")
    sizes = browser.evaluate(f"{visible}.filter(r => !r.hidden).map(r => Number(r.dataset.size))")
    assert len(sizes) == 100 and sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(c.size for c in view.clusters)

    start = time.perf_counter()
    browser.navigate(f"file://{out}/clusters-0020.html")
    page_seconds = time.perf_counter() - start
    loaded = "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
    assert browser.wait_for(f"{loaded} > 0")
    total = browser.evaluate("document.images.length")
    assert total == 50 * 24
    assert browser.evaluate(loaded) < total / 2  # the rest wait until scrolled to
    assert browser.problems() == []
    artifacts = repo_root() / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "report-1000-clusters.json").write_text(
        json.dumps({"index_load_seconds": index_seconds, "page_load_seconds": page_seconds}) + "\n"
    )
    assert index_seconds < 30 and page_seconds < 30  # generous: CI machines are shared
