"""What the report's pages show, as plain data (built by ``semclust.report.build``), and the
figures every page words the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from semclust.report.collect import Member
from semclust.report.findings import ClusterLabel, DuplicateSummary, LabelSummary
from semclust.report.paths import PathDisplay
from semclust.rundir.labels import FailureSummary


def page_name(page: int) -> str:
    """File name of the 1-based cluster page ``page``."""
    return f"clusters-{page:04d}.html"


@dataclass
class ClusterView:
    cluster: int
    size: int
    mean_distance: float | None  # mean squared L2 to the centroid; None for an empty cluster
    share: float  # the cluster's share of the k-means objective (sum of distances)
    neighbours: list[tuple[int, float]]  # (cluster, centroid cosine), most similar first
    nearest: list[Member] = field(default_factory=list)
    sample: list[Member] = field(default_factory=list)
    label: ClusterLabel | None = None
    rank: int = 0  # 1-based review order
    page: int = 1

    def anchor(self) -> str:
        return f"c{self.cluster}"

    def href(self) -> str:
        return f"{page_name(self.page)}#{self.anchor()}"


@dataclass
class MapView:
    src: str  # relative path of the PNG
    method: str
    points: int
    width: int
    height: int
    labels: dict[int, tuple[float, float]]  # cluster -> (x, y) as fractions of the picture


@dataclass
class ReportView:
    """Everything the pages show; built by :mod:`semclust.report.build`."""

    run_name: str
    generated: str
    version: str
    display: PathDisplay
    spherical: bool
    counts: list[tuple[str, str]]
    stages: list[dict[str, Any]]
    config_rows: list[tuple[str, str]]
    metrics: Any
    k_selection: Any
    clusters: list[ClusterView]  # in review order
    pages: int
    thumbs: dict[int, tuple[str | None, str]]  # image_id -> (relative path or None, error)
    thumb_box: int
    failures: FailureSummary
    duplicates: DuplicateSummary | None
    labels: LabelSummary | None
    map: MapView | None
    notes: list[str] = field(default_factory=list)
    growth: list[dict[str, Any]] = field(default_factory=list)  # ``semclust add`` runs, in order

    @cached_property
    def by_id(self) -> dict[int, ClusterView]:
        return {c.cluster: c for c in self.clusters}

    @cached_property
    def total_images(self) -> int:
        return sum(c.size for c in self.clusters)


def cohesion_text(view: ReportView, mean_distance: float | None) -> str:
    if mean_distance is None:
        return "-"
    if view.spherical:
        # Rows and centroids are unit vectors: squared L2 = 2 - 2 cos.
        return f"{1.0 - mean_distance / 2.0:.3f}"
    return f"{mean_distance:.4g}"


def cohesion_name(view: ReportView) -> str:
    return "mean cosine to centroid" if view.spherical else "mean squared distance to centroid"


def member_score(view: ReportView, m: Member) -> str:
    if m.distance is None:
        return ""
    if view.spherical:
        return f"cos {1.0 - m.distance / 2.0:.3f}"
    return f"d² {m.distance:.4g}"
