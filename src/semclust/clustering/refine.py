"""The refine stage's pieces: the feature store, training a head on it in a Ray task, and
writing the head's assignments (the stage itself is ``refine_stage``).

Reads ``embeddings/``, ``knn/`` (SCAN) and the k-means ``model/``; writes
``assignments_scan/`` or ``assignments_dec/`` (one part per embeddings shard, same part number,
the ``assignments/`` schema) and leaves the k-means ``assignments/`` untouched. For a head,
``distance`` is ``1 - p(cluster)`` and ``distance_2nd`` is ``1 - p(cluster_2nd)``, where p is the
head's soft assignment (a probability in [0, 1]; lower distance = more confident).

Training runs in one Ray task (a GPU when the cluster has one). Its rows come from a local
*feature store*: every embedding, mapped into the k-means model space (normalised, optionally
PCA-projected), written once shard by shard into a memory-mapped file on the task's local disk.
``tf.data`` batches are drawn from that file, so the embeddings never have to fit in memory; the
OS page cache holds what is in use.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.clustering.heads import HeadResult, prepare_keras, top_two
from semclust.clustering.model import KMeansModel
from semclust.config import RefineConfig
from semclust.errors import UserError
from semclust.index.faiss_ops import claimed_cpus
from semclust.rundir.embeddings import (
    ShardSet,
    embedding_shards,
    read_checked,
    read_clusters,
    rows_of_ids,
)
from semclust.rundir.layout import ASSIGNMENTS, assignments_of
from semclust.rundir.tables import assignments_table, knn_parts, part_uri, read_knn_part

log = logging.getLogger(__name__)


# --- the feature store ---------------------------------------------------------------------------


class FeatureStore:
    """Every embedding of a run in model space, in a local memory-mapped file.

    ``features`` is float32 (n, d) (a ``np.memmap``), in shard order; ``ids`` int64 (n,) the
    image ids; ``offsets`` int64 (shards + 1,) the first row of each shard. ``close`` removes the
    file.
    """

    def __init__(self, shards: ShardSet, model: KMeansModel, workdir: str | None = None) -> None:
        self.shards = shards
        self.dir = tempfile.mkdtemp(prefix="semclust-features-", dir=workdir)
        dim = model.transform.out_dim(shards.dim)
        self.features = np.lib.format.open_memmap(
            os.path.join(self.dir, "features.npy"),
            mode="w+",
            dtype=np.float32,
            shape=(shards.total, dim),
        )
        self.ids = np.empty(shards.total, dtype=np.int64)
        self.offsets = np.zeros(len(shards.uris) + 1, dtype=np.int64)
        row = 0
        for i, uri in enumerate(shards.uris):
            ids, vectors = read_checked(uri, shards.dim)
            self.features[row : row + len(ids)] = model.transform.apply(vectors)
            self.ids[row : row + len(ids)] = ids
            row += len(ids)
            self.offsets[i + 1] = row
        if row != shards.total:
            raise RuntimeError(f"read {row} rows but the shards' metadata says {shards.total}")
        self.features.flush()
        self._order = np.argsort(self.ids, kind="stable")
        if len(self.ids) > 1 and (np.diff(self.ids[self._order]) == 0).any():
            raise ValueError("an image id appears twice in embeddings/; re-run `semclust embed`")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Store rows int64 (same shape) of image ids; -1 where an id is not in the store."""
        return rows_of_ids(self.ids, self._order, image_ids)

    def shard_rows(self) -> Iterator[tuple[str, slice]]:
        """(embeddings shard URI, its rows) in shard order."""
        for i, uri in enumerate(self.shards.uris):
            yield uri, slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def neighbour_rows(self, run_dir: str, num_neighbors: int) -> np.ndarray:
        """Each row's nearest ``num_neighbors`` graph neighbours as store rows, int64 (n, m).

        Read from ``knn/`` part by part; a neighbour missing from the store (an id of -1 from
        an approximate search, or a stale row) is replaced by the row itself, which only makes
        that pair a no-op. m is ``num_neighbors`` or the graph's k when that is smaller.
        """
        uris = knn_parts(run_dir)
        if not uris:
            raise UserError(f"no kNN graph in {run_dir!r}: run `semclust graph` first")
        out: np.ndarray | None = None
        seen = 0
        for uri in uris:
            part = read_knn_part(uri, similarities=False)
            m = min(num_neighbors, part.k)
            if out is None:
                out = np.lib.format.open_memmap(
                    os.path.join(self.dir, "neighbours.npy"),
                    mode="w+",
                    dtype=np.int64,
                    shape=(len(self), m),
                )
                out[:] = np.arange(len(self))[:, None]
            elif out.shape[1] != m:
                raise UserError(f"knn/ shards have different k ({uri} has {part.k})")
            rows = self.rows_of(part.ids)
            nrows = self.rows_of(part.neighbors[:, :m])
            ok = rows >= 0
            nrows = np.where(nrows >= 0, nrows, rows[:, None])
            out[rows[ok]] = nrows[ok]
            seen += int(ok.sum())
        assert out is not None
        if seen != len(self):
            raise UserError(
                f"the kNN graph covers {seen} of {len(self)} embedded rows; re-run `semclust "
                "graph` on this run directory"
            )
        out.flush()
        return out

    def close(self) -> None:
        self.features = None  # type: ignore[assignment]
        shutil.rmtree(self.dir, ignore_errors=True)


def match_to(reference: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """A relabelling int64 (k,) of ``pred``'s clusters that best agrees with ``reference``.

    Hungarian matching on the overlap counts, so that a refined cluster keeps the number of the
    k-means cluster it mostly came from (ids in reports and comparisons then line up). Rows
    with a negative reference are ignored; clusters without a partner keep a free id.
    """
    from scipy.optimize import linear_sum_assignment

    ok = reference >= 0
    kr = max(k, int(reference.max()) + 1 if ok.any() else k)
    counts = np.zeros((k, kr), dtype=np.int64)
    np.add.at(counts, (pred[ok], reference[ok]), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    free = iter(sorted(set(range(max(k, kr))) - set(cols.tolist())))
    for c in np.flatnonzero(mapping < 0):
        mapping[c] = next(free)
    return mapping


# --- training and writing ----------------------------------------------------------------------


def refine_task(run_dir: str, rc: RefineConfig) -> dict[str, Any]:
    """Ray task body: build the store, train the head, write the refined assignments parts;
    the stage's record without its lifecycle fields."""
    cpus = claimed_cpus()
    prepare_keras(rc.seed, max(1, int(cpus)) if cpus else None)
    model, summary = KMeansModel.load(run_dir)
    shards = embedding_shards(run_dir)
    k = int(rc.k or summary["k"])
    record: dict[str, Any] = {"method": rc.method, "k": k, "rows": shards.total}
    with runinfo.timed("refine: feature store") as t_store:
        store = FeatureStore(shards, model)
    try:
        record["model_dim"] = store.dim
        kmeans_clusters = read_clusters(run_dir, ASSIGNMENTS, store)
        with runinfo.timed(f"refine: {rc.method} training") as t_train:
            result = train_head(run_dir, rc, store, model, kmeans_clusters, int(summary["k"]))
        record.update(result.summary)
        record["train_seconds"] = t_train["seconds"]
        record["store_seconds"] = t_store["seconds"]
        with runinfo.timed("refine: assignment") as t_assign:
            renumber = rc.method == "scan" and k == int(summary["k"])
            record.update(write_assignments(run_dir, rc, store, result, kmeans_clusters, renumber))
        record["assign_seconds"] = t_assign["seconds"]
    finally:
        store.close()
    return record


def train_head(
    run_dir: str,
    rc: RefineConfig,
    store: FeatureStore,
    model: KMeansModel,
    kmeans_clusters: np.ndarray,
    kmeans_k: int,
) -> HeadResult:
    """Train the ``rc.method`` head on the store's rows: SCAN on the kNN graph's pairs (warm
    started from the k-means clusters when k is the model's), DEC from the model's centroids."""
    if rc.method == "scan":
        from semclust.clustering.scan import train_scan

        k = int(rc.k or kmeans_k)
        neighbours = store.neighbour_rows(run_dir, rc.num_neighbors)
        init = kmeans_clusters if k == kmeans_k else None
        return train_scan(store.features, neighbours, k, rc, init_clusters=init)
    from semclust.clustering.dec import train_dec

    return train_dec(store.features, model.centroids, rc)


def write_assignments(
    run_dir: str,
    rc: RefineConfig,
    store: FeatureStore,
    result: HeadResult,
    kmeans_clusters: np.ndarray,
    renumber: bool,
) -> dict[str, Any]:
    """Predict every row, write one assignments part per embeddings shard; their summary.

    With ``renumber`` (SCAN with the k-means k), clusters are renumbered to match the k-means
    ones they overlap most; DEC keeps the k-means numbers it started from anyway.
    """
    folder = assignments_of(rc.method)
    storage.remove_tree(storage.join(run_dir, folder))
    # First pass: only the top cluster of each row (8 bytes a row) to match the cluster ids.
    pred = np.empty(len(store), dtype=np.int64)
    k = 0
    for _, rows in store.shard_rows():
        probs = result.predict(store.features[rows])
        pred[rows] = np.argmax(probs, axis=1)
        k = probs.shape[1]
    mapping = match_to(kmeans_clusters, pred, k) if renumber else np.arange(k)
    sizes = np.bincount(mapping[pred], minlength=k)
    agree = float(np.mean(mapping[pred] == kmeans_clusters)) if len(pred) else 0.0
    confident = 0
    for uri, rows in store.shard_rows():
        probs = result.predict(store.features[rows])
        probs = probs[:, np.argsort(mapping)]  # column j: the cluster renumbered j
        labels, distances = top_two(probs)
        confident += int((distances[:, 0] <= 1 - rc.confidence_threshold).sum())
        table = assignments_table(store.ids[rows], labels, distances)
        storage.write_parquet(part_uri(run_dir, folder, uri), table)
    return {
        "output": folder,
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "agreement_with_kmeans": round(agree, 5),
        "confident_fraction": round(confident / max(1, len(store)), 5),
    }
