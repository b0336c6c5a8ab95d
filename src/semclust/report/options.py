"""Settings of the report stage."""

from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("auto", "pca", "umap")


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows and how much of it; every number bounds the driver's work."""

    nearest: int = 12  # images nearest each centroid
    sample: int = 12  # seeded random members per cluster (besides the nearest)
    clusters_per_page: int = 50  # cluster galleries per HTML page
    map_sample: int = 5000  # embeddings projected on the 2-D map
    projection: str = "auto"  # auto (UMAP when installed, else PCA) | pca | umap
    neighbours: int = 3  # nearest other clusters listed per cluster
    thumb_size: int = 192  # longest side of a thumbnail, pixels
    thumbs_per_task: int = 64  # thumbnails made by one Ray task
    max_failures: int = 1000  # failure rows listed (all are counted)
    max_duplicate_groups: int = 200  # near-duplicate groups shown (largest first)
    duplicates_per_group: int = 8  # thumbnails per near-duplicate group
    seed: int = 0  # random samples and the map sample

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"report.projection={self.projection!r} is not allowed; choose one of "
                f"{', '.join(PROJECTIONS)}"
            )
        for name in ("clusters_per_page", "thumb_size", "thumbs_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "nearest",
            "sample",
            "map_sample",
            "neighbours",
            "max_failures",
            "max_duplicate_groups",
            "duplicates_per_group",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"report.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.thumb_size < 16:
            raise ValueError(f"report.thumb_size must be >= 16, got {self.thumb_size}")
