"""Small run directories without Ray or models: embeddings, a k-means model with its
assignments, and an exact kNN graph, all in the stages' own schemas.

Shared by the refine, label and evaluate tests; the stages that read these files are the real
ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.kmeans import assign, faiss_kmeans
from semclust.clustering.model import KMeansModel, save_summary
from semclust.clustering.pca import RowTransform
from semclust.config import LabelConfig, RunConfig
from semclust.rundir import schemas
from semclust.rundir.tables import assignments_table, knn_table
from tests.clustering.synthetic import write_run


def elongated_clusters(
    n: int, k: int, dim: int, length: float, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows float32 (n, D) along k random segments (centre + t u, |t| <= length) plus noise,
    and their labels (n,). Long segments are hard for k-means, easy for a kNN graph."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    directions = rng.normal(size=(k, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    t = rng.uniform(-length, length, n)
    x = centres[labels] + t[:, None] * directions[labels] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k (self excluded): (row indices int64 (n, k), similarities float32 (n, k))."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1).astype(np.float32)


def make_run(
    run_dir: Path,
    x: np.ndarray,
    k: int,
    *,
    rows_per_part: int,
    knn_k: int = 10,
    neighbour_noise: float = 0.0,
    seed: int = 0,
    uris: list[str] | None = None,
    embedder: dict | None = None,
) -> np.ndarray:
    """Write embeddings, model/ + assignments/ (spherical k-means) and knn/; returns the ids.

    ``uris`` default to ``uris_of``'s synthetic names; ``embedder`` (an ``EmbedderSpec`` as a
    dict) is recorded as the run's embedder. ``neighbour_noise`` replaces that share of the
    graph's neighbours by random rows.
    """
    if uris is None:
        ids = write_run(run_dir, x, rows_per_part=rows_per_part)
    else:
        ids = _write_embeddings(run_dir, x, uris, rows_per_part)
    if embedder is not None:
        runinfo.update_stage(str(run_dir), "embed", {"status": "done", "embedder": embedder}, {})
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    centroids = faiss_kmeans(xn, k, niter=20, nredo=3, spherical=True, init="kmeans++", seed=seed)
    KMeansModel(RowTransform(spherical=True), centroids).save(str(run_dir))
    summary = {"k": k, "dim": x.shape[1], "spherical": True, "pca": False, "iterations": 20}
    save_summary(str(run_dir), summary)
    labels, dist = assign(x, centroids, spherical=True)
    rows, sims = exact_knn(x, knn_k)
    if neighbour_noise:
        rng = np.random.default_rng(seed + 1)
        swap = rng.random(rows.shape) < neighbour_noise
        rows = np.where(swap, rng.integers(0, len(x), rows.shape), rows)
    for part, s in enumerate(range(0, len(x), rows_per_part)):
        span = slice(s, s + rows_per_part)
        name = f"part-{part:05d}.parquet"
        table = assignments_table(ids[span], labels[span], dist[span])
        storage.write_parquet(str(run_dir / "assignments" / name), table)
        knn = knn_table(ids[span], ids[rows[span]], sims[span])
        storage.write_parquet(str(run_dir / "knn" / name), knn)
    runinfo.update_stage(
        str(run_dir), "graph", {"status": "done", "metric": "cosine", "k": knn_k}, {}
    )
    return ids


def uris_of(ids: np.ndarray) -> list[str]:
    """The URIs ``write_run`` gave rows 0..n-1."""
    return [f"file:///synthetic/img-{i:07d}.jpg" for i in range(len(ids))]


def _write_embeddings(
    run_dir: Path, x: np.ndarray, uris: list[str], rows_per_part: int
) -> np.ndarray:
    ids = np.array([storage.image_id_for(u) for u in uris], dtype=np.int64)
    dim = x.shape[1]
    for part, s in enumerate(range(0, len(x), rows_per_part)):
        span = slice(s, s + rows_per_part)
        n = len(ids[span])
        table = pa.table(
            {
                "image_id": pa.array(ids[span], pa.int64()),
                "uri": pa.array(uris[span], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(x[span], dtype=np.float32).ravel()), dim
                ),
                "width": pa.array(np.full(n, 224), pa.int32()),
                "height": pa.array(np.full(n, 224), pa.int32()),
                "frame_time": pa.nulls(n, pa.float32()),
                "frame_index": pa.nulls(n, pa.int32()),
            },
            schema=schemas.embeddings(dim),
        )
        storage.write_parquet(str(run_dir / "embeddings" / f"part-{part:05d}.parquet"), table)
    return ids


def run_label(run_dir: Path | str, lc: LabelConfig) -> dict:
    """The label stage on ``run_dir`` with ``lc``, under the stage contract; its run.json record."""
    from semclust import runner

    return runner.run_stages(RunConfig(run_dir=str(run_dir), label=lc), ["label"])["label"]
