"""Constants and helpers shared by the report tests."""

from __future__ import annotations

import posixpath
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow.parquet as pq

from semclust.report.collect import Member
from semclust.report.findings import ClusterLabel, LabelSummary
from semclust.report.paths import PathDisplay
from semclust.report.views import ClusterView, ReportView
from semclust.rundir.labels import FailureSummary

N_CLASSES, PER_CLASS = 12, 6
# A file name that is markup: it must show up as text, never as an element.
EVIL_FAILURE = "<img src=x onerror=alert(1)>.jpg"
# A good image whose name is markup too, so that it reaches a gallery caption and alt text.
EVIL_IMAGE = '"><svg onload=alert(2)> & co.jpg'
UNLABELLED_CLASS = "ihc"  # its images get no label row


def run_report(run: Path, **options: object) -> dict:
    """The report stage on ``run`` with these ``report`` settings, under the stage contract (so
    run.json gets its record); the record."""
    from semclust import runner
    from semclust.config import ReportConfig, RunConfig

    cfg = RunConfig(run_dir=str(run), report=ReportConfig(**options))  # type: ignore[arg-type]
    return runner.run_stages(cfg, ["report"])["report"]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def embedded_images(run: Path) -> dict[int, str]:
    """image_id -> uri of every embedded image."""
    table = pq.read_table(run / "embeddings", columns=["image_id", "uri"])
    return dict(zip(table["image_id"].to_pylist(), table["uri"].to_pylist(), strict=True))


class PageParser(HTMLParser):
    """The parts of a page the tests check: element ids, links, images, scripts, galleries."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []  # href and src values
        self.images: list[dict[str, str]] = []
        self.scripts = 0
        self.tags: list[str] = []
        self.galleries: list[tuple[str, str, list[int]]] = []  # (cluster anchor, kind, ids)
        self.rows: list[dict[str, str]] = []  # cluster-table rows' data attributes
        self._section = ""
        self._table = ""
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self._section = a.get("id", "")
        if tag == "table":
            self._table = a.get("id", "")
        if tag == "tr" and self._table == "cluster-table" and "data-cluster" in a:
            self.rows.append(a)
        if tag == "div" and "data-kind" in a:
            self.galleries.append((self._section, a["data-kind"], []))
        if tag == "figure" and "data-id" in a:
            self.galleries[-1][2].append(int(a["data-id"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html_text: str) -> PageParser:
    p = PageParser()
    p.feed(html_text)
    p.close()
    return p


def local_link_target(page: str, link: str) -> tuple[str, str]:
    """(path relative to the report folder, fragment) of a relative link on ``page``."""
    parts = urlsplit(link)
    assert not parts.scheme and not parts.netloc, f"{page}: non-relative link {link!r}"
    assert not parts.path.startswith("/"), f"{page}: absolute path {link!r}"
    if not parts.path:
        return page, parts.fragment
    return posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(parts.path))), (
        parts.fragment
    )


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_view(
    k: int, per_cluster: int, thumbs: list[str], per_page: int = 50, hide_local: bool = False
) -> ReportView:
    """A report of ``k`` made-up clusters whose images all use the given thumbnail files."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5000, size=k)
    mean = rng.uniform(0.2, 1.2, size=k)
    total = float((sizes * mean).sum())
    clusters = []
    image = 0
    members: dict[int, tuple[str | None, str]] = {}
    for c in range(k):
        shown = []
        for j in range(per_cluster):
            image += 1
            members[image] = (thumbs[image % len(thumbs)], "")
            shown.append(
                Member(image, c, float(j) / 10, f"s3://bucket/photos/{c}/{j}.jpg", 640, 480)
            )
        clusters.append(
            ClusterView(
                cluster=c,
                size=int(sizes[c]),
                mean_distance=float(mean[c]),
                share=float(sizes[c] * mean[c]) / total,
                neighbours=[((c + 1) % k, 0.9), ((c + 2) % k, 0.8)],
                nearest=shown[: per_cluster // 2],
                sample=shown[per_cluster // 2 :],
                label=ClusterLabel(f"label {c}", 0.8, 0.7, 10, "test"),
            )
        )
    clusters.sort(key=lambda v: -v.share)
    for i, v in enumerate(clusters):
        v.rank, v.page = i + 1, i // per_page + 1
    return ReportView(
        run_name="synthetic",
        generated="2026-01-01 00:00 UTC",
        version="test",
        display=PathDisplay("s3://bucket/photos", hide_local=hide_local),
        spherical=True,
        counts=[("embedded", "9,999")],
        stages=[{"stage": "embed", "status": "done", "seconds": 1.0, "rows": 5, "throughput": 5}],
        config_rows=[],
        metrics={"kmeans": {"nmi": 0.5}},
        k_selection=None,
        clusters=clusters,
        pages=clusters[-1].page,
        thumbs=members,
        thumb_box=192,
        failures=FailureSummary(0, [], [], []),
        duplicates=None,
        labels=LabelSummary({}, {}, 0),
        map=None,
    )
