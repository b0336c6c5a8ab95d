"""The refine stage: a clustering head (SCAN or DEC) trained on frozen embeddings.

Reads ``embeddings/``, ``knn/`` (SCAN) and the k-means ``model/``; writes
``assignments_scan/`` or ``assignments_dec/`` (one shard per embeddings shard, same part number,
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
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow.compute as pc

from semclust import runinfo, storage
from semclust.clustering.kmeans import ASSIGNMENTS_DIR, KMeansModel, assignments_table
from semclust.clustering.shards import (
    ShardSet,
    embedding_shards,
    read_checked,
    read_clusters,
    rows_of_ids,
)
from semclust.config import REFINE_METHODS, RefineConfig, _choice

log = logging.getLogger(__name__)

_PREDICT_BATCH = 8192


def assignments_dir(method: str) -> str:
    """``assignments_scan`` / ``assignments_dec``: where a head's assignments go."""
    _choice("refine.method", method, REFINE_METHODS)
    return f"{ASSIGNMENTS_DIR}_{method}"


def stage_name(method: str) -> str:
    """The run.json stage of a refine method: ``refine_scan`` or ``refine_dec``."""
    _choice("refine.method", method, REFINE_METHODS)
    return f"refine_{method}"


# --- Keras set-up --------------------------------------------------------------------------------


def prepare_keras(seed: int, threads: int | None = None) -> None:
    """Seed Python, NumPy and the backend; give TensorFlow ``threads`` CPU threads.

    Must run before the process's first TensorFlow op (thread settings are fixed after it); a
    GPU, when TensorFlow sees one, gets memory growth so that FAISS can share it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
            if threads:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError as exc:  # already initialised in this process: keep its settings
            log.debug("TensorFlow already initialised: %s", exc)
    keras.utils.set_random_seed(seed)


def predict_in_batches(model: Any, features: np.ndarray, batch: int = _PREDICT_BATCH) -> np.ndarray:
    """``model`` on float32 rows (n, d) in inference mode, chunk by chunk: float32 (n, ...)."""
    outs = [
        np.asarray(model(np.ascontiguousarray(features[s : s + batch]), training=False))
        for s in range(0, len(features), batch)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clusters int64 (n, 2), distances float32 (n, 2)) from probabilities float (n, k).

    The two most probable clusters, most probable first; distance = 1 - probability.
    """
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    p = np.take_along_axis(probs, order, axis=1)
    return order.astype(np.int64), (1.0 - p).astype(np.float32)


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

        Read from ``knn/`` shard by shard; a neighbour missing from the store (an id of -1 from
        an approximate search, or a stale row) is replaced by the row itself, which only makes
        that pair a no-op. m is ``num_neighbors`` or the graph's k when that is smaller.
        """
        from semclust.clustering.knn import KNN_DIR

        uris = storage.list_shards(storage.join(run_dir, KNN_DIR))
        if not uris:
            raise ValueError(f"no kNN graph in {run_dir!r}: run `semclust graph` first")
        out: np.ndarray | None = None
        seen = 0
        for uri in uris:
            table = storage.read_parquet(uri, ["image_id", "neighbors"])
            col = table.column("neighbors").combine_chunks()
            k = col.type.list_size
            m = min(num_neighbors, k)
            if out is None:
                out = np.lib.format.open_memmap(
                    os.path.join(self.dir, "neighbours.npy"),
                    mode="w+",
                    dtype=np.int64,
                    shape=(len(self), m),
                )
                out[:] = np.arange(len(self))[:, None]
            elif out.shape[1] != m:
                raise ValueError(f"knn/ shards have different k ({uri} has {k})")
            rows = self.rows_of(table.column("image_id").to_numpy())
            neighbours = pc.list_flatten(col).to_numpy().reshape(-1, k)[:, :m]
            nrows = self.rows_of(neighbours)
            ok = rows >= 0
            nrows = np.where(nrows >= 0, nrows, rows[:, None])
            out[rows[ok]] = nrows[ok]
            seen += int(ok.sum())
        assert out is not None
        if seen != len(self):
            raise ValueError(
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


# --- the stage -----------------------------------------------------------------------------------


def _claimed_cpus() -> int | None:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return max(1, int(cpus)) if cpus else None
    except Exception:  # outside Ray: TensorFlow's own default
        return None


def refine_task(run_dir: str, rc: RefineConfig) -> dict[str, Any]:
    """Ray task body: build the store, train the head, write the refined assignments shards."""
    prepare_keras(rc.seed, _claimed_cpus())
    model, summary = KMeansModel.load(run_dir)
    shards = embedding_shards(run_dir)
    k = int(rc.k or summary["k"])
    if rc.method == "dec" and rc.k is not None and rc.k != summary["k"]:
        raise ValueError(
            f"refine.k={rc.k}: DEC starts from the k-means centroids, so k is the model's "
            f"({summary['k']}); leave refine.k unset or re-run `semclust cluster --k {rc.k}`"
        )
    record: dict[str, Any] = {"method": rc.method, "k": k, "rows": shards.total}
    with runinfo.timed("refine: feature store") as t_store:
        store = FeatureStore(shards, model)
    try:
        record["model_dim"] = store.dim
        kmeans_clusters = read_clusters(run_dir, ASSIGNMENTS_DIR, store)
        with runinfo.timed(f"refine: {rc.method} training") as t_train:
            if rc.method == "scan":
                from semclust.clustering.scan import train_scan

                neighbours = store.neighbour_rows(run_dir, rc.num_neighbors)
                result = train_scan(
                    store.features,
                    neighbours,
                    k,
                    rc,
                    init_clusters=kmeans_clusters if k == summary["k"] else None,
                )
            else:
                from semclust.clustering.dec import train_dec

                result = train_dec(store.features, model.centroids, rc)
        record.update(result.summary)
        record["train_seconds"] = t_train["seconds"]
        record["store_seconds"] = t_store["seconds"]
        with runinfo.timed("refine: assignment") as t_assign:
            renumber = rc.method == "scan" and k == int(summary["k"])
            record.update(_write_assignments(run_dir, rc, store, result, kmeans_clusters, renumber))
        record["assign_seconds"] = t_assign["seconds"]
    finally:
        store.close()
    return record


def _write_assignments(
    run_dir: str,
    rc: RefineConfig,
    store: FeatureStore,
    result: Any,
    kmeans_clusters: np.ndarray,
    renumber: bool,
) -> dict[str, Any]:
    """Predict every row, write one assignments shard per embeddings shard.

    With ``renumber`` (SCAN with the k-means k), clusters are renumbered to match the k-means
    ones they overlap most; DEC keeps the k-means numbers it started from anyway.
    """
    out_dir = storage.join(run_dir, assignments_dir(rc.method))
    storage.remove_tree(out_dir)
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
        storage.write_parquet(storage.join(out_dir, uri.rsplit("/", 1)[-1]), table)
    return {
        "output": assignments_dir(rc.method),
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "agreement_with_kmeans": round(agree, 5),
        "confident_fraction": round(confident / max(1, len(store)), 5),
    }


def run_refine(
    run_dir: str,
    rc: RefineConfig,
    *,
    mode: str = "resume",
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Train the SCAN or DEC head of a run and write its assignments; the run.json record.

    ``mode="resume"`` returns the earlier record when the stage already finished with the same
    settings on the same embeddings; ``overwrite`` (or other settings) trains again.
    """
    import ray

    from semclust.clustering.faiss_ops import (
        node_resources,
        record_failure,
        unwrap_remote_errors,
    )
    from semclust.config import RayConfig
    from semclust.ray_runtime import ensure_ray, use_gpu

    if mode not in ("resume", "overwrite"):
        raise ValueError(f"mode={mode!r} is not allowed; choose one of resume, overwrite")
    start = time.perf_counter()
    shards = embedding_shards(run_dir)
    KMeansModel.load(run_dir)  # fails early, with a message, when there is no model
    stage = stage_name(rc.method)
    settings = {"refine": asdict(rc), "embeddings": shards.fingerprint()}
    config = {stage: asdict(rc)}
    previous = runinfo.load(run_dir).get("stages", {}).get(stage, {})
    out_dir = storage.join(run_dir, assignments_dir(rc.method))
    if (
        mode == "resume"
        and previous.get("status") == "done"
        and previous.get("settings") == settings
        and len(storage.list_shards(out_dir)) == len(shards.uris)
    ):
        log.info("refine %s: already done with the same settings", rc.method)
        return previous
    if mode == "overwrite":
        from semclust.embed.pipeline import prepare_run_dir

        prepare_run_dir(run_dir, mode, stage)  # its assignments and the labels made from them
    ensure_ray(RayConfig(address=ray_address, num_cpus=num_cpus))
    gpu = use_gpu(rc.device)
    cpus, _ = node_resources()
    resources: dict[str, float] = {"num_cpus": float(rc.num_cpus or max(1.0, cpus))}
    if gpu:
        resources["num_gpus"] = 1.0
    runinfo.update_stage(run_dir, stage, {"status": "running", "settings": settings}, config)
    with record_failure(run_dir, stage, settings, config):
        task = ray.remote(storage.with_s3_options(refine_task)).options(**resources)
        record = unwrap_remote_errors(lambda: ray.get(task.remote(run_dir, rc)))()
    record.update(
        status="done",
        settings=settings,
        device="gpu" if gpu else "cpu",
        seconds=round(time.perf_counter() - start, 3),
    )
    runinfo.update_stage(run_dir, stage, record, config)
    return record


# --- command line --------------------------------------------------------------------------------


def run_refine_command(cfg: Any) -> int:
    """``semclust refine`` with a RunConfig: prints a one-line summary."""
    if not cfg.run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    rc = cfg.refine
    record = run_refine(
        cfg.run_dir, rc, mode=cfg.mode, ray_address=cfg.ray.address, num_cpus=cfg.ray.num_cpus
    )
    print(
        f"refine {rc.method}: k={record['k']}, {record['rows']} rows -> {record['output']}/, "
        f"sizes {record['cluster_sizes']}, {record['seconds']:.1f} s"
    )
    return 0
