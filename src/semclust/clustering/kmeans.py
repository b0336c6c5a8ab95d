"""The cluster stage: FAISS k-means on a sample, then every row assigned shard by shard in Ray.

Training runs in one Ray task (all GPUs of a node when there are any, else its CPUs): it draws a
seeded sample of at most ``max_points_per_centroid * k`` rows shard by shard, learns the optional
PCA/whitening, runs k-means (k-means++ or random init, ``nredo`` restarts, best objective kept;
two-level for very large k) and writes ``model/``:

- ``centroids.npy``: float32 (k, d) in model space (after ``pca.npz`` when there is one),
- ``pca.npz``: the projection (see ``pca.RowTransform``), only when PCA/whitening is used,
- ``coarse.npz``: two-level models only, coarse centroids (k1, d) and each centroid's parent,
- ``k_selection.json``: with ``k=auto``, the scores of every k tried,
- ``kmeans.json``: written last, so its presence marks a complete model.

Assignment runs in Ray actors that load the model from the run directory and each write
``assignments/part-NNNNN.parquet`` (same part number as the embeddings shard) with ``image_id``,
``cluster``/``distance`` (nearest centroid) and ``cluster_2nd``/``distance_2nd``. Distances are
squared L2 in model space; with spherical k-means the rows are unit vectors there, so a distance
is ``2 - 2 cos``.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.faiss_ops import (
    adopt_storage,
    claimed_cpus,
    nearest_two,
    record_failure,
    resolve_gpus,
    set_threads,
    to_gpus,
    unwrap_remote_errors,
)
from semclust.clustering.pca import RowTransform
from semclust.clustering.shards import (
    ShardSet,
    embedding_shards,
    normalize_rows,
    read_checked,
    same_settings,
    sample_rows,
    sample_size,
)
from semclust.config import ClusterConfig, RunConfig, parse_bytes

log = logging.getLogger(__name__)

MODEL_DIR = "model"
ASSIGNMENTS_DIR = "assignments"
_ELBOW_SILHOUETTE_TOLERANCE = 0.02  # silhouettes this close to the best count as a tie

ASSIGNMENTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("cluster", pa.int32()),
        ("distance", pa.float32()),
        ("cluster_2nd", pa.int32()),
        ("distance_2nd", pa.float32()),
    ]
)


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansModel:
    """Centroids float32 (k, d) in model space, the transform into it, and the coarse level."""

    transform: RowTransform
    centroids: np.ndarray
    coarse: np.ndarray | None = None  # float32 (k1, d), two-level models only
    parents: np.ndarray | None = None  # int32 (k,), each centroid's coarse cluster

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def save(self, run_dir: str) -> None:
        """Write the model files (not ``kmeans.json``, the caller's completion marker)."""
        model_dir = storage.join(run_dir, MODEL_DIR)
        storage.write_bytes(storage.join(model_dir, "centroids.npy"), _npy(self.centroids))
        if self.transform.uses_pca:
            storage.write_bytes(storage.join(model_dir, "pca.npz"), self.transform.to_npz())
        if self.coarse is not None:
            buf = io.BytesIO()
            np.savez(buf, centroids=self.coarse, parents=self.parents)
            storage.write_bytes(storage.join(model_dir, "coarse.npz"), buf.getvalue())

    @classmethod
    def load(cls, run_dir: str) -> tuple[KMeansModel, dict[str, Any]]:
        """The complete model of a run and its ``kmeans.json`` summary."""
        model_dir = storage.join(run_dir, MODEL_DIR)
        marker = storage.join(model_dir, "kmeans.json")
        if not storage.exists(marker):
            raise ValueError(f"{run_dir!r} has no complete k-means model: run `semclust cluster`")
        summary = storage.read_json(marker)
        raw = storage.read_bytes(storage.join(model_dir, "centroids.npy"))
        centroids = np.load(io.BytesIO(raw))
        transform = RowTransform(spherical=summary["spherical"])
        if summary.get("pca"):
            raw = storage.read_bytes(storage.join(model_dir, "pca.npz"))
            transform = RowTransform.from_npz(raw)
        coarse = parents = None
        if summary.get("coarse_k"):
            data = np.load(io.BytesIO(storage.read_bytes(storage.join(model_dir, "coarse.npz"))))
            coarse, parents = data["centroids"], data["parents"]
        return cls(transform, centroids, coarse, parents), summary


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class CentroidAssigner:
    """Two nearest centroids of embeddings, exact (flat) or through the coarse level (IVF).

    A flat search costs k d per row: fine up to some thousands of centroids, or on a GPU. For a
    two-level model on CPU the centroids are put in an IVF whose lists are the coarse clusters,
    and ``nprobe`` of them are searched per row.
    """

    def __init__(self, model: KMeansModel, *, gpus: int = 0, nprobe: int = 16) -> None:
        import faiss

        self.model = model
        dim = model.centroids.shape[1]
        self.exact = faiss.IndexFlatL2(dim)
        self.exact.add(model.centroids)
        self.index = self.exact
        self.method = "flat"
        if gpus:
            self.index = to_gpus(self.exact, shard=False)
            self.method = "flat (GPU)"
        elif model.coarse is not None:
            # Kept on self: the IVF does not own its quantizer in Python.
            self._quantizer = faiss.IndexFlatL2(dim)
            self._quantizer.add(model.coarse)
            ivf = faiss.IndexIVFFlat(self._quantizer, dim, len(model.coarse), faiss.METRIC_L2)
            ivf.is_trained = True
            ivf.add(model.centroids)
            ivf.nprobe = min(nprobe, len(model.coarse))
            self.index = ivf
            self.method = f"ivf over {len(model.coarse)} coarse clusters, nprobe {ivf.nprobe}"

    def assign_model_space(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clusters int64 (n, 2), squared L2 float32 (n, 2)) of model-space rows (n, d)."""
        labels, dist = nearest_two(self.index, x)
        missing = (labels < 0).any(axis=1)
        if missing.any():
            # The probed lists held fewer than two centroids: those rows get the exact answer.
            labels[missing], dist[missing] = nearest_two(self.exact, x[missing])
        return labels, dist

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clusters int64 (n, 2), squared L2 float32 (n, 2)) of embeddings float32 (n, D)."""
        return self.assign_model_space(self.model.transform.apply(vectors))


def assign(
    vectors: np.ndarray, centroids: np.ndarray, spherical: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two nearest centroids of float32 (n, D) rows (no PCA): ((n, 2) int64, (n, 2) f32)."""
    model = KMeansModel(RowTransform(spherical=spherical), np.asarray(centroids, np.float32))
    return CentroidAssigner(model).assign(vectors)


# --- training ----------------------------------------------------------------------------------


_GREEDY_INIT_MAX_K = 1024  # above this, FAISS's own (non-greedy) k-means++ seeds instead
_GREEDY_INIT_ROWS_PER_CENTROID = 32  # seeding looks at this many sample rows per centroid


def greedy_kmeanspp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds: float32 (k, d) rows of ``x`` float32 (n, d).

    Each new seed is the best (lowest total squared distance) of ``2 + ln k`` candidates drawn
    with probability proportional to the squared distance to the nearest seed so far. Plain
    k-means++ draws one candidate; on well-separated data it often puts two seeds in one cluster
    and k-means cannot move them apart, the greedy draw rarely does.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    trials = 2 + int(math.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    chosen = [int(rng.integers(n))]
    closest = np.maximum(sq + sq[chosen[0]] - 2.0 * (x @ x[chosen[0]]), 0.0)
    potential = float(closest.sum(dtype=np.float64))
    for _ in range(1, k):
        if potential <= 0:  # every row is already a seed's duplicate: any rows will do
            rest = np.setdiff1d(np.arange(n), chosen)[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        draws = rng.random(trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(closest, dtype=np.float64), draws), n - 1)
        dist = sq[candidates][:, None] + sq[None, :] - 2.0 * (x[candidates] @ x.T)
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        potentials = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest, potential = dist[best], float(potentials[best])
    return x[chosen].copy()


def faiss_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int,
    spherical: bool,
    init: str,
    seed: int,
    gpus: int = 0,
) -> np.ndarray:
    """k-means on float32 (n, d) rows (all used: sample first); centroids float32 (k, d).

    ``init="kmeans++"`` seeds each of the ``nredo`` runs with greedy k-means++ (different seeds)
    and keeps the run with the lowest sum of squared distances; ``"random"`` lets FAISS seed and
    restart. Lloyd iterations run in FAISS, on the GPUs when ``gpus`` > 0.
    """
    import faiss

    n, dim = x.shape
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} rows; choose k <= {n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    greedy = init == "kmeans++" and k <= _GREEDY_INIT_MAX_K
    best: tuple[float, np.ndarray] | None = None
    for redo in range(nredo if greedy else 1):
        km = faiss.Kmeans(
            dim,
            k,
            niter=niter,
            nredo=1 if greedy else nredo,
            spherical=spherical,
            seed=seed + redo,
            # The caller sampled already: FAISS must neither subsample again nor warn about few
            # points per centroid (train_kmeans logs that).
            max_points_per_centroid=max(1, math.ceil(n / k)),
            min_points_per_centroid=1,
            init_method=(
                faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
                if init == "kmeans++"
                else faiss.ClusteringInitMethod_RANDOM
            ),
            gpu=gpus if gpus > 0 else False,
            verbose=False,
        )
        if greedy:
            rows = np.random.default_rng(seed + redo).permutation(n)
            rows = rows[: max(k, _GREEDY_INIT_ROWS_PER_CENTROID * k)]
            km.train(x, init_centroids=greedy_kmeanspp(x[np.sort(rows)], k, seed + redo))
        else:
            km.train(x)
        centroids = np.asarray(km.centroids, dtype=np.float32)
        if nredo == 1 or not greedy:
            return centroids
        index = faiss.IndexFlatL2(dim)
        index.add(centroids)
        objective = float(nearest_two(index, x)[1][:, 0].sum(dtype=np.float64))
        if best is None or objective < best[0]:
            best = (objective, centroids)
    assert best is not None
    return best[1]


def _allocate(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split k centroids over coarse clusters in proportion to their sizes.

    Every non-empty cluster gets at least one and never more than its row count; the total is k
    (largest-remainder rounding, then one-at-a-time repair).
    """
    n = sizes.sum()
    share = k * sizes / n
    alloc = np.minimum(np.maximum(np.floor(share), (sizes > 0).astype(float)), sizes).astype(int)
    while alloc.sum() < k:
        room = np.where(alloc < sizes, share - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > k:
        over = np.where(alloc > 1, alloc - share, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    return alloc


def _two_level(
    x: np.ndarray, k: int, cc: ClusterConfig, gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-level k-means: sqrt(k) coarse clusters, then each split in proportion to its size.

    Returns (centroids float32 (k, d), coarse float32 (k1, d), parents int32 (k,)).
    """
    import faiss

    k1 = max(2, min(round(math.sqrt(k)), len(x) // 2))
    common = {"niter": cc.niter, "spherical": cc.spherical, "init": cc.init, "gpus": gpus}
    coarse = faiss_kmeans(x, k1, nredo=cc.nredo, seed=cc.seed, **common)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(coarse)
    labels = nearest_two(index, x)[0][:, 0]
    alloc = _allocate(k, np.bincount(labels, minlength=k1))
    centroids, parents = [], []
    for c in np.flatnonzero(alloc):
        rows = x[labels == c]
        if alloc[c] == 1:
            sub = rows.mean(axis=0, keepdims=True)
            sub = normalize_rows(sub) if cc.spherical else sub
        else:
            sub = faiss_kmeans(rows, int(alloc[c]), nredo=1, seed=cc.seed + int(c), **common)
        centroids.append(sub.astype(np.float32))
        parents.append(np.full(len(sub), c, dtype=np.int32))
    return np.concatenate(centroids), coarse, np.concatenate(parents)


def use_two_level(cc: ClusterConfig, k: int) -> bool:
    return cc.hierarchical == "on" or (cc.hierarchical == "auto" and k >= cc.hierarchical_min_k)


def train_kmeans(
    sample: np.ndarray, cc: ClusterConfig, gpus: int = 0, k: int | None = None
) -> tuple[KMeansModel, dict[str, Any]]:
    """Learn the transform and k-means on float32 (n, D) sample rows.

    ``k`` defaults to ``cc.k`` (which must then be an integer). Returns the model and a summary
    whose ``objective`` is the sum of squared L2 distances of the sample rows to their nearest
    centroid in model space (lower is better; comparable across restarts, not across k).
    """
    k = int(k if k is not None else cc.k)
    n, dim = sample.shape
    if k > n:
        raise ValueError(f"cluster.k={k} is larger than the {n} rows to cluster; choose k <= {n}")
    if n < 39 * k:
        log.warning("k-means: %d rows for k=%d: under 39 per centroid, clusters may be poor", n, k)
    transform = RowTransform.fit(sample, cc.pca_dim, cc.whiten, cc.spherical)
    x = transform.apply(sample)
    two_level = use_two_level(cc, k)
    if two_level:
        centroids, coarse, parents = _two_level(x, k, cc, gpus)
        model = KMeansModel(transform, centroids, coarse, parents)
    else:
        centroids = faiss_kmeans(
            x,
            k,
            niter=cc.niter,
            nredo=cc.nredo,
            spherical=cc.spherical,
            init=cc.init,
            seed=cc.seed,
            gpus=gpus,
        )
        model = KMeansModel(transform, centroids)
    assigner = CentroidAssigner(model, gpus=gpus, nprobe=cc.assign_nprobe)
    _, dist = assigner.assign_model_space(x)
    summary = {
        "k": k,
        "dim": dim,
        "model_dim": int(x.shape[1]),
        "metric": "spherical (L2-normalised rows, squared L2 = 2 - 2 cos)"
        if cc.spherical
        else "squared l2",
        "spherical": cc.spherical,
        "pca": transform.uses_pca,
        "pca_dim": int(x.shape[1]) if transform.uses_pca else None,
        "whiten": transform.whiten,
        "init": cc.init,
        "iterations": cc.niter,
        "nredo": cc.nredo,
        "objective": float(dist[:, 0].sum(dtype=np.float64)),
        "mean_sq_distance": float(dist[:, 0].mean(dtype=np.float64)),
        "trained_on": n,
        "seed": cc.seed,
        "gpus": gpus,
        "coarse_k": len(model.coarse) if model.coarse is not None else None,
    }
    return model, summary


# --- k = auto ----------------------------------------------------------------------------------


def k_candidates(k_min: int, k_max: int, count: int, n: int) -> list[int]:
    """Every k in [k_min, k_max] when there are at most ``count``, else ``count`` spread
    geometrically; never more than n - 1 (a silhouette needs two rows in some cluster)."""
    k_max = min(k_max, n - 1)
    if k_max < k_min:
        raise ValueError(
            f"cluster.k=auto needs more rows than k_min={k_min}; the sample has {n} rows"
        )
    if k_max - k_min + 1 <= count:
        return list(range(k_min, k_max + 1))
    return sorted({round(float(v)) for v in np.geomspace(k_min, k_max, count)})


def elbow(ks: list[int], objectives: list[float]) -> int | None:
    """The k farthest below the chord from the first to the last point of the objective curve
    (both axes scaled to [0, 1]); None with fewer than 3 points or a flat curve."""
    if len(ks) < 3:
        return None
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    obj = np.asarray(objectives, float)
    span = obj.max() - obj.min()
    if span <= 0:
        return None
    y = (obj - obj.min()) / span
    chord = y[0] + (y[-1] - y[0]) * x
    return int(ks[int(np.argmax(chord - y))])


def select_k(sample: np.ndarray, cc: ClusterConfig, gpus: int = 0) -> tuple[int, dict[str, Any]]:
    """Try candidate k on float32 (n, D) sample rows; pick by silhouette, break ties by elbow.

    For each k: k-means (one run), the objective (sum of squared distances) and the silhouette
    on ``silhouette_sample`` rows. The chosen k has the best silhouette, or, among those within
    0.02 of it, the one nearest the objective's elbow. Returns (k, the table for k_selection.json).
    """
    from sklearn.metrics import silhouette_score

    transform = RowTransform.fit(sample, cc.pca_dim, cc.whiten, cc.spherical)
    x = transform.apply(sample)
    rng = np.random.default_rng(cc.seed)
    sil_rows = rng.choice(len(x), size=min(cc.silhouette_sample, len(x)), replace=False)
    # One distance matrix for every candidate k (float64 (m, m), m = silhouette_sample).
    sil_x = x[sil_rows].astype(np.float64)
    sil_sq = np.einsum("ij,ij->i", sil_x, sil_x)
    sil_dist = np.sqrt(np.maximum(sil_sq[:, None] + sil_sq[None, :] - 2 * sil_x @ sil_x.T, 0))
    np.fill_diagonal(sil_dist, 0.0)
    rows = []
    for k in k_candidates(cc.k_min, cc.k_max, cc.k_candidates, len(x)):
        start = time.perf_counter()
        centroids = faiss_kmeans(
            x,
            k,
            niter=cc.niter,
            nredo=1,
            spherical=cc.spherical,
            init=cc.init,
            seed=cc.seed,
            gpus=gpus,
        )
        assigner = CentroidAssigner(KMeansModel(transform, centroids), gpus=gpus)
        labels, dist = assigner.assign_model_space(x)
        sil_labels = labels[sil_rows, 0]
        silhouette = (
            float(silhouette_score(sil_dist, sil_labels, metric="precomputed"))
            if len(np.unique(sil_labels)) > 1
            else -1.0
        )
        rows.append(
            {
                "k": k,
                "objective": float(dist[:, 0].sum(dtype=np.float64)),
                "silhouette": round(silhouette, 5),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        log.info("k=auto: k=%d silhouette %.4f", k, silhouette)
    ks = [r["k"] for r in rows]
    best = max(r["silhouette"] for r in rows)
    knee = elbow(ks, [r["objective"] for r in rows])
    best_k = max(rows, key=lambda r: r["silhouette"])["k"]
    near_best = [r["k"] for r in rows if r["silhouette"] >= best - _ELBOW_SILHOUETTE_TOLERANCE]
    chosen = best_k if knee is None else min(near_best, key=lambda k: (abs(k - knee), k))
    table = {
        "chosen_k": chosen,
        "best_silhouette_k": best_k,
        "elbow_k": knee,
        "rule": "best silhouette; among silhouettes within "
        f"{_ELBOW_SILHOUETTE_TOLERANCE} of it, the k nearest the objective's elbow",
        "sample_rows": len(x),
        "silhouette_rows": len(sil_rows),
        "candidates": rows,
    }
    return chosen, table


# --- the stage ---------------------------------------------------------------------------------


def train_and_save(
    run_dir: str, shards: ShardSet, cc: ClusterConfig, s3: Any = None
) -> dict[str, Any]:
    """Ray task body: sample, (select k,) train, write ``model/`` with ``kmeans.json`` last."""
    adopt_storage(s3)
    set_threads(claimed_cpus())
    gpus = resolve_gpus(cc.device, "cluster training")
    max_bytes = parse_bytes(cc.max_sample_memory)
    selection = None
    start = time.perf_counter()
    if cc.k == "auto":
        rows = sample_size(cc.k_sample, shards.dim, max_bytes)
        k, selection = select_k(sample_rows(shards, rows, cc.seed), cc, gpus)
        storage.write_json(storage.join(run_dir, MODEL_DIR, "k_selection.json"), selection)
    else:
        k = int(cc.k)
    select_seconds = round(time.perf_counter() - start, 3)
    wanted = cc.max_points_per_centroid * k
    rows = sample_size(wanted, shards.dim, max_bytes)
    if rows < min(wanted, shards.total):
        log.warning(
            "k-means sample capped at %d rows by cluster.max_sample_memory=%s (wanted %d)",
            rows,
            cc.max_sample_memory,
            wanted,
        )
    start = time.perf_counter()
    sample = sample_rows(shards, rows, cc.seed)
    model, summary = train_kmeans(sample, cc, gpus, k)
    summary["train_seconds"] = round(time.perf_counter() - start, 3)
    if selection is not None:
        summary["k_selection"] = {
            key: selection[key] for key in ("chosen_k", "best_silhouette_k", "elbow_k")
        }
        summary["k_selection_seconds"] = select_seconds
    summary["settings"] = asdict(cc)
    model.save(run_dir)
    # kmeans.json last: its presence marks a complete model.
    storage.write_json(storage.join(run_dir, MODEL_DIR, "kmeans.json"), summary)
    return summary


class AssignActor:
    """Holds one model (loaded from the run directory) and assigns whole shards with it."""

    def __init__(
        self, run_dir: str, device: str, nprobe: int, threads: float, s3: Any = None
    ) -> None:
        adopt_storage(s3)
        set_threads(threads)
        self.model, summary = KMeansModel.load(run_dir)
        self.dim = summary["dim"]
        gpus = resolve_gpus(device, "cluster assignment")
        self.assigner = CentroidAssigner(self.model, gpus=gpus, nprobe=nprobe)

    def assign_shard(self, shard_uri: str, out_uri: str) -> dict[str, Any]:
        """Read one embeddings shard, write its assignments shard; return rows and sizes."""
        return assign_shard_with(self.assigner, shard_uri, out_uri, self.dim)


def assign_shard_with(
    assigner: CentroidAssigner, shard_uri: str, out_uri: str, dim: int
) -> dict[str, Any]:
    """Assign one shard with ``assigner`` and write its ``assignments/`` shard atomically."""
    ids, vectors = read_checked(shard_uri, dim)
    labels, distances = assigner.assign(vectors)
    table = assignments_table(ids, labels, distances)
    storage.write_parquet(out_uri, table)
    return {"rows": len(ids), "sizes": np.bincount(labels[:, 0], minlength=assigner.model.k)}


def assignments_table(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> pa.Table:
    """The ``assignments/`` schema from ids (n,), labels int (n, 2) and distances (n, 2)."""
    return pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "cluster": pa.array(labels[:, 0].astype(np.int32)),
            "distance": pa.array(distances[:, 0].astype(np.float32)),
            "cluster_2nd": pa.array(labels[:, 1].astype(np.int32)),
            "distance_2nd": pa.array(distances[:, 1].astype(np.float32)),
        },
        schema=ASSIGNMENTS_SCHEMA,
    )


def _num_actors(requested: int | None, per_actor_cpus: float, gpu: bool, jobs: int) -> int:
    import ray

    if requested is None:
        res = ray.cluster_resources()
        requested = int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1) // per_actor_cpus)
    return max(1, min(requested, jobs))


def run_cluster(cfg: RunConfig) -> dict[str, Any]:
    """Train on a sample in a Ray task, assign every shard in Ray actors; the run.json record."""
    from semclust.embed.pipeline import prepare_run_dir
    from semclust.ray_runtime import ensure_ray

    cc = cfg.cluster
    run_dir = cfg.run_dir
    if not run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    start = time.perf_counter()
    shards = embedding_shards(run_dir)
    if cc.k != "auto" and int(cc.k) > shards.total:
        raise ValueError(
            f"cluster.k={cc.k} is larger than the {shards.total} embedded images; choose "
            f"--k {shards.total} or less"
        )
    if cc.k == "auto" and cc.k_min >= shards.total:
        raise ValueError(
            f"cluster.k=auto: k_min={cc.k_min} needs more than the {shards.total} embedded images"
        )
    if cc.pca_dim is not None and cc.pca_dim > shards.dim:
        raise ValueError(
            f"cluster.pca_dim={cc.pca_dim} is larger than the embedding dimension {shards.dim}"
        )
    prepare_run_dir(run_dir, cfg.mode, "cluster")
    ensure_ray(cfg.ray)
    settings = {"cluster": asdict(cc), "embeddings": shards.fingerprint()}
    model_dir = storage.join(run_dir, MODEL_DIR)
    out_dir = storage.join(run_dir, ASSIGNMENTS_DIR)
    reuse = same_settings(run_dir, "cluster", settings, cfg.mode) and storage.exists(
        storage.join(model_dir, "kmeans.json")
    )
    if not reuse:
        # A model or shards from other settings would mix two clusterings: clear them first.
        storage.remove_tree(model_dir)
        storage.remove_tree(out_dir)
    runinfo.update_stage(
        run_dir, "cluster", {"status": "running", "settings": settings}, cfg.to_dict()
    )
    with record_failure(run_dir, "cluster", settings, cfg.to_dict()):
        record = _train_and_assign(cfg, shards, settings, reuse)
    record["seconds"] = round(time.perf_counter() - start, 3)
    runinfo.update_stage(run_dir, "cluster", record, cfg.to_dict())
    return record


@unwrap_remote_errors
def _train_and_assign(
    cfg: RunConfig, shards: ShardSet, settings: dict[str, Any], reuse: bool
) -> dict[str, Any]:
    import ray
    from ray.util import ActorPool

    from semclust.clustering.faiss_ops import remote_options, task_resources
    from semclust.ray_runtime import use_gpu

    cc = cfg.cluster
    run_dir = cfg.run_dir
    assert run_dir is not None
    model_dir = storage.join(run_dir, MODEL_DIR)
    out_dir = storage.join(run_dir, ASSIGNMENTS_DIR)
    gpu = use_gpu(cc.device)
    if reuse:
        summary = storage.read_json(storage.join(model_dir, "kmeans.json"))
        log.info("cluster: reusing the model in %s (same settings)", model_dir)
    else:
        train = ray.remote(train_and_save).options(**task_resources(cc.device, cc.train_num_cpus))
        summary = ray.get(train.remote(run_dir, shards, cc, storage.s3_options()))
    k = int(summary["k"])

    def out_uri(uri: str) -> str:
        return storage.join(out_dir, uri.rsplit("/", 1)[-1])

    done = set(storage.list_shards(out_dir)) if reuse else set()
    pending = [u for u in shards.uris if out_uri(u) not in done]
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    sizes = np.zeros(k, dtype=np.int64)
    assigned = 0
    for uri in (u for u in shards.uris if out_uri(u) in done):
        clusters = storage.read_parquet(out_uri(uri), ["cluster"])["cluster"].to_numpy()
        sizes += np.bincount(clusters, minlength=k)
        assigned += len(clusters)
    with runinfo.timed("assignment") as assign_time:
        if pending:
            n_actors = _num_actors(cc.num_actors, cc.actor_num_cpus, gpu, len(pending))
            actor_cls = ray.remote(AssignActor).options(
                **remote_options(num_cpus=cc.actor_num_cpus, num_gpus=1 if gpu else 0)
            )
            actors = [
                actor_cls.remote(
                    run_dir, cc.device, cc.assign_nprobe, cc.actor_num_cpus, storage.s3_options()
                )
                for _ in range(n_actors)
            ]
            try:
                for result in ActorPool(actors).map_unordered(
                    lambda a, u: a.assign_shard.remote(u, out_uri(u)), pending
                ):
                    sizes += result["sizes"]
                    assigned += result["rows"]
            finally:  # free their CPUs/GPUs for the next stage, also after a failure
                for actor in actors:
                    ray.kill(actor)
    if assigned != shards.total:
        raise RuntimeError(f"assigned {assigned} rows but the shards hold {shards.total}")
    record = {
        **{key: value for key, value in summary.items() if key != "settings"},
        "status": "done",
        "settings": settings,
        "rows": assigned,
        "assigned_this_run": int(sum(rows_of[u] for u in pending)),
        "device": "gpu" if summary.get("gpus") else "cpu",
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "assign_seconds": assign_time["seconds"],
    }
    return record


def read_assignments(run_dir: str) -> pa.Table:
    """All assignments rows (image_id, cluster, ...); for evaluation and small runs."""
    uris = storage.list_shards(storage.join(run_dir, ASSIGNMENTS_DIR))
    if not uris:
        raise ValueError(f"no assignments in {run_dir!r}: run `semclust cluster` first")
    return pa.concat_tables([storage.read_parquet(u) for u in uris])
