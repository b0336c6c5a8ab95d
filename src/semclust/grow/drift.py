"""Drift of added images: how many sit farther from their centroid than the run's own images.

A cluster's threshold is the ``quantile`` (0.99) of its own images' distances to its centroid
(the run's over all clusters where a cluster has fewer than ``min_rows``); by chance about
1 - quantile of added images from the same distribution fall beyond it. A share well above that
says the new images are not like the ones the clusters were learnt from: past
``add.drift_threshold`` the record advises re-clustering.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from semclust import storage
from semclust.rundir.layout import ASSIGNMENTS

_CLUSTERS_LISTED = 20  # the most drifted clusters kept in run.json


def read_distances(run_dir: str, added_names: set[str]) -> dict[bool, tuple[np.ndarray, ...]]:
    """{added?: (cluster int64, distance float32)} over every assignments part."""
    parts: dict[bool, list[Any]] = {True: [], False: []}
    for uri in storage.list_shards(storage.join(run_dir, ASSIGNMENTS)):
        table = storage.read_parquet(uri, ["cluster", "distance"])
        parts[uri.rsplit("/", 1)[-1] in added_names].append(table)
    out = {}
    for added, tables in parts.items():
        clusters = [t.column("cluster").to_numpy().astype(np.int64) for t in tables]
        distances = [t.column("distance").to_numpy() for t in tables]
        out[added] = (
            np.concatenate([np.empty(0, np.int64), *clusters]),
            np.concatenate([np.empty(0, np.float32), *distances]),
        )
    return out


def measure_drift(
    old: tuple[np.ndarray, np.ndarray],
    added: tuple[np.ndarray, np.ndarray],
    k: int,
    quantile: float,
    min_rows: int,
    threshold: float,
) -> dict[str, Any]:
    """The drift record from the old and the added rows' (cluster, distance)."""
    old_c, old_d = old
    new_c, new_d = added
    if not len(new_c) or not len(old_c):
        return {"rows": len(new_c), "share_beyond": None}
    overall = float(np.quantile(old_d, quantile))
    limits = np.full(k, overall, dtype=np.float64)
    order = np.argsort(old_c, kind="stable")
    bounds = np.searchsorted(old_c[order], np.arange(k + 1))
    for c in np.flatnonzero(np.diff(bounds) >= min_rows):
        limits[c] = np.quantile(old_d[order[bounds[c] : bounds[c + 1]]], quantile)
    beyond = new_d > limits[new_c]
    share = float(beyond.mean())
    per_added = np.bincount(new_c, minlength=k)
    per_beyond = np.bincount(new_c[beyond], minlength=k)
    listed = [c for c in np.argsort(-per_beyond, kind="stable")[:_CLUSTERS_LISTED] if per_beyond[c]]
    drifted = share > threshold
    return {
        "rows": len(new_c),
        "quantile": quantile,
        "beyond": int(beyond.sum()),
        "share_beyond": round(share, 5),
        "expected_share": round(1 - quantile, 5),
        "threshold": threshold,
        "drifted": drifted,
        "advice": (
            f"{share:.1%} of the added images are farther from their centroid than "
            f"{quantile:.0%} of the run's own (expected {1 - quantile:.0%}, advised limit "
            f"{threshold:.0%}): the collection has drifted from what the clusters were learnt "
            "on; re-cluster with `semclust cluster --mode overwrite` (cluster ids change)"
            if drifted
            else None
        ),
        "clusters": [
            {
                "cluster": int(c),
                "added": int(per_added[c]),
                "beyond": int(per_beyond[c]),
                "share_beyond": round(float(per_beyond[c] / per_added[c]), 5),
                "limit": round(float(limits[c]), 6),
            }
            for c in listed
        ],
        "clusters_over_threshold": int(
            ((per_beyond > threshold * per_added) & (per_added >= 10)).sum()
        ),
    }
