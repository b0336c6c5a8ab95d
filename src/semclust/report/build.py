"""Building the report: a run directory -> ``report/`` (static HTML, thumbnails, a 2-D map).

The driver only ever holds per-cluster figures, the few hundred images per page it shows, and
the map sample; reading shards and making thumbnails run in Ray tasks (``RunContext.remote``).
The stage around it is ``semclust.report.stage``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from semclust import __version__, runinfo, storage
from semclust.clustering import model as kmeans_model
from semclust.config import ReportConfig
from semclust.embed.decode import DEFAULT_MAX_PIXELS
from semclust.errors import UserError
from semclust.report import collect, facts, findings
from semclust.report.files import write_file
from semclust.report.map2d import project_2d, render_map, umap_available
from semclust.report.overview import index_page
from semclust.report.paths import PathDisplay
from semclust.report.render import cluster_page, duplicates_page, failures_page
from semclust.report.thumbs import ThumbnailResult, make_thumbnails, thumb_relpath
from semclust.report.views import ClusterView, MapView, ReportView, page_name
from semclust.rundir.labels import read_failures
from semclust.rundir.layout import ASSIGNMENTS, METRICS, REPORT

log = logging.getLogger(__name__)

MAP_FILE = "map.png"
_MAP_LABELS = 30  # clusters named on the map (the largest)


def check_inputs(run_dir: str) -> None:
    """Stop, with what to run first, when the run has no complete k-means model or no
    assignments (the report's galleries are the k-means clusters)."""
    if not kmeans_model.is_complete(run_dir):
        raise UserError(
            f"{run_dir!r} has no complete k-means model: run `semclust cluster` before "
            "`semclust report`"
        )
    if not storage.list_shards(storage.join(run_dir, ASSIGNMENTS)):
        raise UserError(
            f"no assignments in {run_dir!r}: run `semclust cluster` (or `semclust run`) before "
            "`semclust report`"
        )


def build_report(
    run_dir: str, options: ReportConfig | None = None, *, remote: collect.Remote | None = None
) -> dict[str, Any]:
    """Write the HTML report of a run directory; returns what the stage records in run.json:
    ``uri`` (of its ``index.html``), counts and timings.

    ``options.out`` (a local folder or an ``s3://`` prefix) defaults to ``<run_dir>/report``.
    Thumbnails already there are reused. The run needs ``embeddings/``, ``model/`` and
    ``assignments/``; ``metrics.json``, ``model/k_selection.json``, ``labels/`` and
    ``duplicates/`` are shown when present. ``remote`` makes the Ray tasks
    (``RunContext.remote``); by default one bound to the storage settings in force.
    """
    opts = options or ReportConfig()
    check_inputs(run_dir)
    remote = remote or _remote_here(run_dir)
    out = opts.out or storage.join(run_dir, REPORT)
    info = runinfo.load(run_dir)
    model, kmeans = kmeans_model.KMeansModel.load(run_dir)
    timings: dict[str, float] = {}
    shown = _gather(run_dir, model.centroids, opts, remote, timings)
    embed_config = info.get("config", {}).get("embed") or {}
    max_pixels = int(embed_config.get("max_image_pixels") or DEFAULT_MAX_PIXELS)
    images = {m.image_id: (m.uri, m.frame_time) for m in shown.members}
    thumbs = make_thumbnails(
        images, out, opts.thumb_size, opts.thumbs_per_task, max_pixels, remote=remote
    )
    timings["thumbnails"] = thumbs.seconds
    views = _cluster_views(shown.summary, shown.neighbours, shown.labels, opts.clusters_per_page)
    with runinfo.timed("report: map") as t:
        map_view = _write_map(out, shown.summary, shown.found, views, opts)
    timings["map"] = t["seconds"]
    view = _report_view(run_dir, out, info, kmeans, shown, thumbs, views, map_view, opts)
    with runinfo.timed("report: pages") as t:
        pages = _write_pages(out, view)
    timings["pages"] = t["seconds"]
    index_uri = storage.canonical_uri(storage.join(out, "index.html"))
    log.info(
        "report: %d clusters on %d pages, %d thumbnails made (%d reused): %s",
        len(views),
        pages,
        thumbs.made,
        thumbs.reused,
        index_uri,
    )
    return {
        "uri": index_uri,
        "clusters": len(views),
        "pages": pages,
        "images_shown": len(images),
        "thumbnails_made": thumbs.made,
        "thumbnails_reused": thumbs.reused,
        "thumbnails_failed": len(thumbs.failed),
        "map_points": map_view.points if map_view else 0,
        "projection": map_view.method if map_view else None,
        "timings": timings,
    }


def _remote_here(run_dir: str) -> collect.Remote:
    """Ray tasks under the storage settings in force here (``build_report`` called directly)."""
    from semclust.config import RunConfig
    from semclust.context import RunContext

    remote: collect.Remote = RunContext(
        RunConfig(run_dir=run_dir, storage=storage.options())
    ).remote
    return remote


@dataclass
class Shown:
    """What the pages show, gathered from the run: per-cluster figures, the images shown
    (with URI, size and label), near-duplicate groups, labels and the map sample."""

    summary: collect.AssignmentSummary
    neighbours: list[list[tuple[int, float]]]
    duplicates: findings.DuplicateSummary | None
    labels: findings.LabelSummary | None
    members: list[collect.Member]
    found: collect.EmbeddingLookup


def _gather(
    run_dir: str,
    centroids: np.ndarray,
    opts: ReportConfig,
    remote: collect.Remote,
    timings: dict[str, float],
) -> Shown:
    k = len(centroids)
    with runinfo.timed("report: cluster summaries") as t:
        summary = collect.summarize_assignments(
            run_dir, k, opts.nearest, opts.sample, opts.map_sample, opts.seed, remote=remote
        )
        neighbours = collect.nearest_clusters(centroids, opts.neighbours)
        duplicates = findings.summarize_duplicates(
            run_dir, opts.max_duplicate_groups, opts.duplicates_per_group
        )
        members = [m for c in range(k) for m in (*summary.nearest[c], *summary.sample[c])]
        if duplicates is not None:
            members += [m for g in duplicates.shown for m in g.members]
        shown_ids = {m.image_id for m in members}
        labels = findings.summarize_labels(run_dir, shown_ids)
    timings["summaries"] = t["seconds"]
    with runinfo.timed("report: image lookup") as t:
        found = collect.lookup_embeddings(run_dir, shown_ids, summary.map_ids, remote=remote)
    timings["lookup"] = t["seconds"]
    for m in members:
        m.uri, m.width, m.height, m.frame_time = found.meta[m.image_id]
        if labels is not None and m.image_id in labels.per_image:
            m.label, m.confidence = labels.per_image[m.image_id]
    return Shown(summary, neighbours, duplicates, labels, members, found)


def _report_view(
    run_dir: str,
    out: str,
    info: dict[str, Any],
    kmeans: dict[str, Any],
    shown: Shown,
    thumbs: ThumbnailResult,
    views: list[ClusterView],
    map_view: MapView | None,
    opts: ReportConfig,
) -> ReportView:
    config = info.get("config", {})
    failures = read_failures(run_dir, opts.max_failures)
    display = PathDisplay(
        facts.input_root(config, [m.uri for m in shown.members] + [u for u, _, _ in failures.rows]),
        hide_local=storage.is_remote(out),
    )
    notes = []
    if thumbs.failed:
        notes.append(
            f"{len(thumbs.failed):,} thumbnails could not be made (their originals could not be "
            "read or decoded); the galleries show the reason in their place."
        )
    thumb_paths: dict[int, tuple[str | None, str]] = {
        i: (None, thumbs.failed[i]) if i in thumbs.failed else (thumb_relpath(i), "")
        for i in {m.image_id for m in shown.members}
    }
    return ReportView(
        run_name=posixpath.basename(storage.canonical_uri(run_dir).rstrip("/")),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        display=display,
        spherical=facts.is_spherical(config, kmeans),
        counts=facts.counts(
            run_dir,
            info,
            len(views),
            shown.summary,
            shown.labels,
            shown.duplicates,
            failures.total,
        ),
        stages=facts.stage_rows(info),
        config_rows=facts.config_rows(info, kmeans, display),
        metrics=collect.read_optional_json(storage.join(run_dir, METRICS)),
        k_selection=collect.read_optional_json(
            kmeans_model.model_file(run_dir, kmeans_model.K_SELECTION)
        ),
        clusters=views,
        pages=max((v.page for v in views), default=1),
        thumbs=thumb_paths,
        thumb_box=opts.thumb_size,
        failures=failures,
        duplicates=shown.duplicates,
        labels=shown.labels,
        map=map_view,
        notes=notes + facts.growth_notes(info),
        growth=facts.growth_rows(info),
    )


def _cluster_views(
    summary: collect.AssignmentSummary,
    neighbours: list[list[tuple[int, float]]],
    labels: findings.LabelSummary | None,
    per_page: int,
) -> list[ClusterView]:
    """Clusters in review order: largest share of the objective (size x mean distance) first,
    so large and loose clusters get looked at before small tight ones; empty ones last."""
    total = float(summary.dist_sum.sum())
    sizes = summary.counts
    views = []
    for c in range(summary.k):
        size = int(sizes[c])
        share = float(summary.dist_sum[c]) / total if total > 0 else size / max(summary.rows, 1)
        views.append(
            ClusterView(
                cluster=c,
                size=size,
                mean_distance=float(summary.dist_sum[c]) / size if size else None,
                share=share,
                neighbours=neighbours[c],
                nearest=summary.nearest[c],
                sample=summary.sample[c],
                label=labels.per_cluster.get(c) if labels is not None else None,
            )
        )
    views.sort(key=lambda v: (v.size == 0, -v.share, -v.size, v.cluster))
    for i, v in enumerate(views):
        v.rank = i + 1
        v.page = i // per_page + 1
    return views


def _write_map(
    out: str,
    summary: collect.AssignmentSummary,
    found: collect.EmbeddingLookup,
    views: list[ClusterView],
    opts: ReportConfig,
) -> MapView | None:
    if opts.map_sample == 0 or not len(found.map_ids):
        return None
    cluster_of = dict(zip(summary.map_ids.tolist(), summary.map_clusters.tolist(), strict=True))
    clusters = np.array([cluster_of[i] for i in found.map_ids.tolist()], dtype=np.int64)
    if opts.projection == "auto" and not umap_available():
        log.info("report: umap-learn is not installed; the map uses PCA")
    coords, method = project_2d(found.map_vectors, opts.projection, opts.seed)
    largest = [v.cluster for v in sorted(views, key=lambda v: -v.size)[:_MAP_LABELS] if v.size]
    width, height = 1100, 760
    png, positions = render_map(coords, clusters, largest, width, height)
    write_file(storage.join(out, MAP_FILE), png)
    return MapView(MAP_FILE, method, len(coords), width, height, positions)


def _write_pages(out: str, view: ReportView) -> int:
    """Write every page, then remove cluster pages left over from a larger earlier report."""
    written = {"index.html", "failures.html", "duplicates.html"}
    write_file(storage.join(out, "index.html"), index_page(view).encode())
    write_file(storage.join(out, "failures.html"), failures_page(view).encode())
    write_file(storage.join(out, "duplicates.html"), duplicates_page(view).encode())
    for page in range(1, view.pages + 1):
        write_file(storage.join(out, page_name(page)), cluster_page(view, page).encode())
        written.add(page_name(page))
    prefix = storage.canonical_uri(out).rstrip("/") + "/"
    for uri, _ in storage.list_files(out, recursive=False):
        name = uri[len(prefix) :] if uri.startswith(prefix) else ""
        if name.startswith("clusters-") and name.endswith(".html") and name not in written:
            storage.remove_tree(storage.join(out, name))
    return view.pages
