"""The run's facts the overview shows, from run.json and the stages' records: counts, stage
timings, the settings that matter, where the images came from."""

from __future__ import annotations

import posixpath
from typing import Any

from semclust import storage
from semclust.report import collect, findings
from semclust.report.markup import fmt
from semclust.report.paths import PathDisplay
from semclust.rundir.layout import EMBEDDINGS
from semclust.stages import names as stage_names

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


def is_spherical(config: dict[str, Any], kmeans: dict[str, Any]) -> bool:
    if "spherical" in kmeans:
        return bool(kmeans["spherical"])
    metric = str(kmeans.get("metric", ""))
    if metric:
        return metric.startswith("spherical")
    return bool((config.get("cluster") or {}).get("spherical", True))


def counts(
    run_dir: str,
    info: dict[str, Any],
    k: int,
    summary: collect.AssignmentSummary,
    labels: findings.LabelSummary | None,
    duplicates: findings.DuplicateSummary | None,
    failed_rows: int,
) -> list[tuple[str, str]]:
    """The overview's count cards."""
    embed = (info.get("stages") or {}).get("embed") or {}
    embedded = embed.get("embedded")
    grown = bool(growth_rows(info))
    if embedded is None or grown:  # after `semclust add` the embed record counts its input only
        embedded = collect.count_rows(storage.join(run_dir, EMBEDDINGS))
    failed = failed_rows if grown else embed.get("failed", failed_rows)
    listed = embedded + failed if grown else embed.get("listed", embedded + failed)
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


def stage_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage record in run.json, in pipeline order (run.json keeps its keys
    sorted); records of no known stage follow by name."""
    pipeline = stage_names()
    stages = info.get("stages") or {}
    order = sorted(stages, key=lambda s: (pipeline.index(s) if s in pipeline else len(pipeline), s))
    rows = []
    for stage in order:
        rec = stages[stage]
        if stage == "report" or not isinstance(rec, dict):
            continue
        # The first count a record has; a stage may keep a breakdown (a dict) under "rows".
        n = next((rec[key] for key in ("listed", "rows", "count") if _is_count(rec.get(key))), None)
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


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def config_rows(
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


def growth_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``semclust add`` that added images: input, rows, failures, drift."""
    record = (info.get("stages") or {}).get("add") or {}
    rows = []
    for run in record.get("runs", []):
        if not run.get("rows_added"):
            continue
        drift = run.get("drift") or {}
        rows.append(
            {
                "input": run.get("input"),
                "added": run["rows_added"],
                "failed": (run.get("embed") or {}).get("failed"),
                "rows_after": run.get("rows"),
                "share_beyond": drift.get("share_beyond"),
                "expected_share": drift.get("expected_share"),
                "drifted": bool(drift.get("drifted")),
                "clusters": drift.get("clusters", [])[:5],
            }
        )
    return rows


def growth_notes(info: dict[str, Any]) -> list[str]:
    """The last add's advice to re-cluster, when it gave one."""
    runs = ((info.get("stages") or {}).get("add") or {}).get("runs", [])
    advice = (runs[-1].get("drift") or {}).get("advice") if runs else None
    return [f"Drift: {advice}."] if advice else []
