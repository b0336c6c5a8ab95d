"""Near-duplicate groups: connected components of the kNN graph's edges above a threshold.

Reads ``knn/`` shard by shard (never the embeddings), keeps only edges whose similarity is at
least the threshold, and joins their endpoints into groups (undirected). Writes
``duplicates/part-NNNNN.parquet`` with ``image_id`` and ``group`` int64 for every image in a group
of two or more; the group id is the smallest image id in the group, so it is stable across runs
(when a run grows, a group keeps the id it had: ``keep_group_ids``).
A run with no duplicates writes one empty part, so a finished stage always leaves a file.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from semclust import storage
from semclust.rundir.embeddings import ShardSet
from semclust.rundir.layout import DUPLICATES
from semclust.rundir.tables import duplicates_table, knn_parts, read_knn_part

log = logging.getLogger(__name__)

ROWS_PER_PART = 1_000_000
_LARGEST = 10  # groups summarised in run.json
_EXAMPLES = 5  # URIs shown per summarised group


def strong_edges(knn_uri: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) image ids int64 (m,) of one knn part's edges with similarity >= t."""
    part = read_knn_part(knn_uri)
    assert part.similarities is not None
    mask = (part.similarities >= threshold) & (part.neighbors >= 0)
    return np.repeat(part.ids, mask.sum(axis=1)), part.neighbors[mask]


def duplicate_groups(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the undirected edges src[i] - dst[i] (image ids int64 (m,)).

    Returns (image ids int64 (g,), group int64 (g,)) for every id on an edge, sorted by group then
    id; a group's id is its smallest image id.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(src) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes = np.unique(np.concatenate([src, dst]))
    a, b = np.searchsorted(nodes, src), np.searchsorted(nodes, dst)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    count, labels = connected_components(graph, directed=False)
    smallest = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, labels, nodes)
    groups = smallest[labels]
    order = np.lexsort((nodes, groups))
    return nodes[order], groups[order]


def _uris_of(shards: ShardSet, wanted: set[int]) -> dict[int, str]:
    """URIs of a few image ids, read from the embeddings' id and URI columns shard by shard."""
    found: dict[int, str] = {}
    for uri in shards.uris:
        if len(found) == len(wanted):
            break
        table = storage.read_parquet(uri, ["image_id", "uri"])
        ids = table.column("image_id").to_numpy()
        hit = np.flatnonzero(np.isin(ids, list(wanted)))
        for row in hit:
            found[int(ids[row])] = table.column("uri")[int(row)].as_py()
    return found


def keep_group_ids(
    ids: np.ndarray, groups: np.ndarray, before: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Groups renamed so that a group holding images of an earlier grouping ``before`` (ids,
    groups) keeps the earlier id (the smallest, where it joins several), and one with none keeps
    its own; sorted by group then id. A run that grows (``semclust add``) keeps its group ids."""
    old_ids, old_groups = before
    if not len(ids) or not len(old_ids):
        return ids, groups
    order = np.argsort(old_ids)
    pos = np.minimum(np.searchsorted(old_ids, ids, sorter=order), len(old_ids) - 1)
    hit = old_ids[order[pos]] == ids
    earlier = np.where(hit, old_groups[order[pos]], np.iinfo(np.int64).max)
    names, index = np.unique(groups, return_inverse=True)
    renamed = np.full(len(names), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(renamed, index, earlier)
    renamed = np.where(renamed == np.iinfo(np.int64).max, names, renamed)
    new_groups = renamed[index]
    order = np.lexsort((ids, new_groups))
    return ids[order], new_groups[order]


def write_duplicates(
    run_dir: str,
    shards: ShardSet,
    threshold: float,
    keep: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Find the groups from ``knn/``, write ``duplicates/``, return the run.json summary;
    ``keep``: an earlier grouping whose group ids carry over (``keep_group_ids``)."""
    parts = [strong_edges(u, threshold) for u in knn_parts(run_dir)]
    src = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    dst = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    ids, groups = duplicate_groups(src, dst)
    if keep is not None:
        ids, groups = keep_group_ids(ids, groups, keep)
    out_dir = storage.join(run_dir, DUPLICATES)
    storage.remove_tree(out_dir)
    for part, s in enumerate(range(0, max(len(ids), 1), ROWS_PER_PART)):
        table = duplicates_table(ids[s : s + ROWS_PER_PART], groups[s : s + ROWS_PER_PART])
        storage.write_parquet(storage.join(out_dir, f"part-{part:05d}.parquet"), table)
    group_ids, sizes = np.unique(groups, return_counts=True)
    top = np.argsort(-sizes, kind="stable")[:_LARGEST]
    examples = {int(g): ids[groups == g][:_EXAMPLES] for g in group_ids[top]}
    uri_of = _uris_of(shards, {int(i) for members in examples.values() for i in members})
    largest = [
        {
            "group": int(group_ids[t]),
            "size": int(sizes[t]),
            "examples": [uri_of.get(int(i), str(int(i))) for i in examples[int(group_ids[t])]],
        }
        for t in top
    ]
    log.info("duplicates: %d groups holding %d images", len(group_ids), len(ids))
    return {
        "threshold": threshold,
        "edges": len(src),
        "groups": len(group_ids),
        "images": len(ids),
        "largest": largest,
    }
