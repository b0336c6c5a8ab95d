"""What the other stages found about the images the report shows: the majority label of each
cluster (labels/) and the near-duplicate groups (duplicates/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.report.collect import Member
from semclust.rundir import tables
from semclust.rundir.embeddings import RunRows, read_clusters
from semclust.rundir.labels import read_labels
from semclust.rundir.layout import ASSIGNMENTS


@dataclass
class ClusterLabel:
    label: str
    share: float  # fraction of the cluster's labelled images that carry this label
    confidence: float | None  # mean confidence of those images
    labelled: int  # labelled images in the cluster
    source: str


@dataclass
class LabelSummary:
    per_cluster: dict[int, ClusterLabel]
    per_image: dict[int, tuple[str, float | None]]  # shown image -> (label, confidence)
    rows: int


def summarize_labels(run_dir: str, shown_ids: set[int]) -> LabelSummary | None:
    """Majority label per (k-means) cluster and the labels of the shown images, if labels/
    exists.

    Each label row's cluster is looked up through the run's rows (``RunRows``: 8 bytes a row
    on the driver, plus the clusters), never the embeddings.
    """
    labels = read_labels(run_dir)
    if labels is None or not storage.list_shards(storage.join(run_dir, ASSIGNMENTS)):
        return None
    rows = RunRows.load(run_dir)
    clusters = read_clusters(run_dir, ASSIGNMENTS, rows)
    where = rows.rows_of(labels.column("image_id").to_numpy())
    cluster = np.where(where >= 0, clusters[np.maximum(where, 0)], -1)
    assigned = labels.filter(pa.array(cluster >= 0)).append_column(
        "cluster", pa.array(cluster[cluster >= 0], pa.int64())
    )
    per_label = assigned.group_by(["cluster", "label"]).aggregate(
        [("image_id", "count"), ("confidence", "mean"), ("source", "distinct")]
    )
    return LabelSummary(
        _majority_labels(per_label.to_pylist()), _shown_labels(labels, shown_ids), labels.num_rows
    )


def _majority_labels(rows: list[dict[str, Any]]) -> dict[int, ClusterLabel]:
    """Each cluster's most frequent label from (cluster, label) counts."""
    totals: dict[int, int] = {}
    for row in rows:
        totals[row["cluster"]] = totals.get(row["cluster"], 0) + row["image_id_count"]
    per_cluster: dict[int, ClusterLabel] = {}
    # Most images first, then the label name, so that ties are broken the same way every time.
    for row in sorted(rows, key=lambda r: (-r["image_id_count"], str(r["label"]))):
        c = int(row["cluster"])
        if c in per_cluster:
            continue
        per_cluster[c] = ClusterLabel(
            label=str(row["label"]),
            share=row["image_id_count"] / totals[c],
            confidence=row["confidence_mean"],
            labelled=totals[c],
            source=", ".join(sorted(str(s) for s in row["source_distinct"] if s is not None)),
        )
    return per_cluster


def _shown_labels(labels: pa.Table, shown_ids: set[int]) -> dict[int, tuple[str, float | None]]:
    mine = labels.filter(
        pc.is_in(labels.column("image_id"), pa.array(sorted(shown_ids), pa.int64()))
    )
    per_image: dict[int, tuple[str, float | None]] = {}
    for row in mine.to_pylist():
        prev = per_image.get(row["image_id"])
        conf = row["confidence"]
        # An image with labels from several sources shows its most confident one.
        if prev is None or (conf or 0.0) > (prev[1] or 0.0):
            per_image[row["image_id"]] = (str(row["label"]), conf)
    return per_image


@dataclass
class DuplicateGroup:
    group: int
    size: int
    members: list[Member]


@dataclass
class DuplicateSummary:
    groups: int  # groups of two or more images
    images: int  # images in those groups
    shown: list[DuplicateGroup] = field(default_factory=list)


def summarize_duplicates(run_dir: str, max_groups: int, per_group: int) -> DuplicateSummary | None:
    """Near-duplicate groups, largest first (then by group id), each with its first
    ``per_group`` image ids; None when the run has no duplicates/."""
    found = tables.read_duplicates(run_dir)
    if found is None:
        return None
    order = np.lexsort(found)  # by group, then image id
    ids, groups = found[0][order], found[1][order]
    names, starts, sizes = np.unique(groups, return_index=True, return_counts=True)
    several = sizes >= 2
    names, starts, sizes = names[several], starts[several], sizes[several]
    ranked = np.lexsort((names, -sizes))
    shown = [
        DuplicateGroup(
            int(names[g]),
            int(sizes[g]),
            [Member(int(i)) for i in ids[starts[g] : starts[g] + min(per_group, sizes[g])]],
        )
        for g in ranked[:max_groups]
    ]
    return DuplicateSummary(len(names), int(sizes.sum()), shown)
