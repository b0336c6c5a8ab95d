"""The report stage: a run directory -> ``report/`` (static HTML, thumbnails, a 2-D map).

The driver only ever holds per-cluster figures, the few hundred images per page it shows, and
the map sample; reading shards and making thumbnails run in Ray tasks.
"""

from __future__ import annotations

import logging
import posixpath
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from semclust import __version__, runinfo, storage
from semclust.config import RayConfig
from semclust.embed.decode import DEFAULT_MAX_PIXELS
from semclust.report import collect
from semclust.report.files import write_file
from semclust.report.map2d import project_2d, render_map, umap_available
from semclust.report.options import ReportOptions
from semclust.report.paths import PathDisplay
from semclust.report.render import (
    ClusterView,
    MapView,
    ReportView,
    cluster_page,
    duplicates_page,
    failures_page,
    fmt,
    index_page,
    page_name,
)
from semclust.report.thumbs import make_thumbnails, thumb_relpath

log = logging.getLogger(__name__)

REPORT_DIR = "report"
MAP_FILE = "map.png"
_MAP_LABELS = 30  # clusters named on the map (the largest)

# Settings worth seeing next to the results, as (section, key).
_SHOWN_SETTINGS = (
    ("embed", "backbone"),
    ("embed", "weights"),
    ("embed", "image_size"),
    ("embed", "resize"),
    ("embed", "normalize"),
    ("cluster", "k"),
    ("cluster", "spherical"),
    ("cluster", "niter"),
    ("cluster", "nredo"),
    ("cluster", "seed"),
    ("graph", "k"),
    ("graph", "metric"),
    ("index", "type"),
)


def build_report(
    run_dir: str,
    out_dir: str | None = None,
    *,
    options: ReportOptions | None = None,
    ray_config: RayConfig | None = None,
) -> str:
    """Write the HTML report of a run directory; returns the URI of its ``index.html``.

    ``out_dir`` (a local folder or an ``s3://`` prefix) defaults to ``<run_dir>/report``.
    Thumbnails already there are reused. The run needs ``embeddings/``, ``model/`` and
    ``assignments/``; ``metrics.json``, ``model/k_selection.json``, ``labels/`` and
    ``duplicates/`` are shown when present. A ``report`` record is added to ``run.json``.
    """
    from semclust.ray_runtime import ensure_ray

    opts = options or ReportOptions()
    start = time.perf_counter()
    if not storage.exists(run_dir):
        raise ValueError(f"run directory {run_dir!r} does not exist")
    out = out_dir or storage.join(run_dir, REPORT_DIR)
    info = runinfo.load(run_dir)
    config = info.get("config", {})
    centroids = collect.read_centroids(run_dir)
    k = len(centroids)
    kmeans = collect.read_optional_json(storage.join(run_dir, collect.MODEL_DIR, "kmeans.json"))
    kmeans = kmeans or {}
    spherical = _is_spherical(config, kmeans)
    timings: dict[str, float] = {}
    with runinfo.timed("report: connecting to Ray") as t:
        ensure_ray(ray_config or RayConfig())
    timings["ray"] = t["seconds"]

    with runinfo.timed("report: cluster summaries") as t:
        summary = collect.summarize_assignments(
            run_dir, k, opts.nearest, opts.sample, opts.map_sample, opts.seed
        )
        neighbours = collect.nearest_clusters(centroids, opts.neighbours)
        duplicates = collect.read_duplicates(
            run_dir, opts.max_duplicate_groups, opts.duplicates_per_group
        )
        shown = [m for c in range(k) for m in (*summary.nearest[c], *summary.sample[c])]
        if duplicates is not None:
            shown += [m for g in duplicates.shown for m in g.members]
        shown_ids = {m.image_id for m in shown}
        labels = collect.read_labels(run_dir, shown_ids)
    timings["summaries"] = t["seconds"]

    with runinfo.timed("report: image lookup") as t:
        found = collect.lookup_embeddings(run_dir, shown_ids, summary.map_ids)
    timings["lookup"] = t["seconds"]
    for m in shown:
        m.uri, m.width, m.height = found.meta[m.image_id]
        if labels is not None and m.image_id in labels.per_image:
            m.label, m.confidence = labels.per_image[m.image_id]

    max_pixels = int((config.get("embed") or {}).get("max_image_pixels") or DEFAULT_MAX_PIXELS)
    thumbs = make_thumbnails(
        {m.image_id: m.uri for m in shown}, out, opts.thumb_size, opts.thumbs_per_task, max_pixels
    )
    timings["thumbnails"] = thumbs.seconds
    thumb_paths: dict[int, tuple[str | None, str]] = {
        i: (None, thumbs.failed[i]) if i in thumbs.failed else (thumb_relpath(i), "")
        for i in shown_ids
    }

    views = _cluster_views(summary, neighbours, labels, opts.clusters_per_page)
    with runinfo.timed("report: map") as t:
        map_view = _write_map(out, summary, found, views, opts)
    timings["map"] = t["seconds"]

    failures = collect.read_failures(run_dir, opts.max_failures)
    display = PathDisplay(
        input_root(config, [m.uri for m in shown] + [u for u, _, _ in failures.rows]),
        hide_local=storage.is_remote(out),
    )
    notes = []
    if thumbs.failed:
        notes.append(
            f"{len(thumbs.failed):,} thumbnails could not be made (their originals could not be "
            "read or decoded); the galleries show the reason in their place."
        )
    view = ReportView(
        run_name=posixpath.basename(storage.canonical_uri(run_dir).rstrip("/")),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        display=display,
        spherical=spherical,
        counts=_counts(run_dir, info, k, summary, labels, duplicates, failures.total),
        stages=_stage_rows(info),
        config_rows=_config_rows(info, kmeans, display),
        metrics=collect.read_optional_json(storage.join(run_dir, "metrics.json")),
        k_selection=collect.read_optional_json(
            storage.join(run_dir, collect.MODEL_DIR, "k_selection.json")
        ),
        clusters=views,
        pages=max((v.page for v in views), default=1),
        thumbs=thumb_paths,
        thumb_box=opts.thumb_size,
        failures=failures,
        duplicates=duplicates,
        labels=labels,
        map=map_view,
        notes=notes,
    )
    with runinfo.timed("report: pages") as t:
        pages = _write_pages(out, view)
    timings["pages"] = t["seconds"]

    index_uri = storage.canonical_uri(storage.join(out, "index.html"))
    seconds = round(time.perf_counter() - start, 3)
    record = {
        "status": "done",
        "uri": index_uri,
        "clusters": k,
        "pages": pages,
        "images_shown": len(shown_ids),
        "thumbnails_made": thumbs.made,
        "thumbnails_reused": thumbs.reused,
        "thumbnails_failed": len(thumbs.failed),
        "map_points": map_view.points if map_view else 0,
        "projection": map_view.method if map_view else None,
        "timings": timings,
        "seconds": seconds,
    }
    runinfo.update_stage(run_dir, "report", record, config)
    log.info(
        "report: %d clusters on %d pages, %d thumbnails made (%d reused) in %.1f s: %s",
        k,
        pages,
        thumbs.made,
        thumbs.reused,
        seconds,
        index_uri,
    )
    return index_uri


def _is_spherical(config: dict[str, Any], kmeans: dict[str, Any]) -> bool:
    if "spherical" in kmeans:
        return bool(kmeans["spherical"])
    metric = str(kmeans.get("metric", ""))
    if metric:
        return metric.startswith("spherical")
    return bool((config.get("cluster") or {}).get("spherical", True))


def _cluster_views(
    summary: collect.AssignmentSummary,
    neighbours: list[list[tuple[int, float]]],
    labels: collect.LabelSummary | None,
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
    opts: ReportOptions,
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


def _counts(
    run_dir: str,
    info: dict[str, Any],
    k: int,
    summary: collect.AssignmentSummary,
    labels: collect.LabelSummary | None,
    duplicates: collect.DuplicateSummary | None,
    failed_rows: int,
) -> list[tuple[str, str]]:
    embed = (info.get("stages") or {}).get("embed") or {}
    embedded = embed.get("embedded")
    if embedded is None:
        embedded = collect.count_rows(storage.join(run_dir, collect.EMBEDDINGS_DIR))
    failed = embed.get("failed", failed_rows)
    listed = embed.get("listed", embedded + failed)
    counts = [
        ("listed", fmt(listed)),
        ("embedded", fmt(embedded)),
        ("failed", fmt(failed)),
    ]
    if embed.get("skipped_non_image"):
        counts.append(("skipped (not images)", fmt(embed["skipped_non_image"])))
    counts += [("assigned", fmt(summary.rows)), ("clusters", fmt(k))]
    empty = int((summary.counts == 0).sum())
    if empty:
        counts.append(("empty clusters", fmt(empty)))
    if labels is not None:
        counts.append(("label rows", fmt(labels.rows)))
    if duplicates is not None:
        counts.append(("near-duplicate groups", fmt(duplicates.groups)))
    return counts


# Pipeline order for the stage table (run.json keeps its keys sorted); others follow by name.
_STAGE_ORDER = ("embed", "cluster", "graph", "refine", "label", "index", "evaluate")


def _stage_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    stages = info.get("stages") or {}
    order = sorted(
        stages,
        key=lambda s: (_STAGE_ORDER.index(s) if s in _STAGE_ORDER else len(_STAGE_ORDER), s),
    )
    rows = []
    for stage in order:
        rec = stages[stage]
        if stage == "report" or not isinstance(rec, dict):
            continue
        n = next((rec[key] for key in ("listed", "rows", "count") if key in rec), None)
        seconds = rec.get("seconds")
        rate = rec.get("images_per_second")
        if rate is None and n and seconds:
            rate = round(n / seconds, 2)
        rows.append(
            {
                "stage": stage,
                "status": rec.get("status", "done"),
                "seconds": seconds,
                "rows": n,
                "throughput": rate,
            }
        )
    return rows


def input_root(config: dict[str, Any], uris: list[str]) -> str | None:
    """The folder/prefix the images came from: the configured input when it holds them all,
    else the longest folder common to the URIs (run.json's config is the last stage's, which
    may not name the input)."""
    if not uris:
        return None
    configured = (config.get("embed") or {}).get("input")
    if configured:
        try:
            root = storage.canonical_uri(configured).rstrip("/") + "/"
        except ValueError:
            root = ""
        if root and all(u.startswith(root) for u in uris):
            return root
    prefix = posixpath.commonprefix(uris)
    prefix = prefix[: prefix.rfind("/") + 1]
    scheme_end = prefix.find("://") + 3
    return prefix if prefix.rstrip("/") and len(prefix) > scheme_end + 1 else None


def _config_rows(
    info: dict[str, Any], kmeans: dict[str, Any], display: PathDisplay
) -> list[tuple[str, str]]:
    config = info.get("config") or {}
    # The embed stage records the embedder it really used; the config is the last stage's.
    embedder = ((info.get("stages") or {}).get("embed") or {}).get("embedder") or {}
    used = {"image_size": embedder.get("input_size"), **embedder}
    rows = []
    for section, key in _SHOWN_SETTINGS:
        value = (config.get(section) or {}).get(key)
        if section == "embed" and used.get(key) is not None:
            value = used[key]
        if value is not None:
            # Settings are identifiers (a seed, a size), not quantities: no thousands separators.
            text = fmt(value) if isinstance(value, (bool, float)) else str(value)
            rows.append((f"{section}.{key}", display.text(text)))
    if kmeans.get("objective") is not None:
        rows.append(("k-means objective", fmt(kmeans["objective"])))
    if kmeans.get("trained_on") is not None:
        rows.append(("k-means trained on", f"{fmt(kmeans['trained_on'])} rows"))
    return rows
