"""Where everything lives in a run directory: one name per folder or file, used by every stage,
the report, the benchmarks and the tests (ARCHITECTURE.md, "Run directory contracts")."""

from __future__ import annotations

from semclust import storage

EMBEDDINGS = "embeddings"  # part-NNNNN.parquet; a shard here is a committed part
FAILURES = "failures"  # part-NNNNN.parquet, written before its embeddings shard
EMBED_TODO = "embed-todo"  # the embed stage's to-do parts while it runs (embed.todo)
MODEL = "model"  # k-means centroids, PCA, kmeans.json (written last)
ASSIGNMENTS = "assignments"  # k-means; assignments_<method> for a refine head
KNN = "knn"
DUPLICATES = "duplicates"
INDEX = "index"
LABELS = "labels"
METRICS = "metrics.json"
REPORT = "report"
RUN_JSON = "run.json"
RUN_LOCK = "run.lock"


def assignments_of(method: str) -> str:
    """The assignments folder of a clustering: ``kmeans`` -> assignments/, a head ->
    assignments_<head>/."""
    return ASSIGNMENTS if method == "kmeans" else f"{ASSIGNMENTS}_{method}"


def path(run_dir: str, name: str) -> str:
    """The URI of a folder or file of the run directory."""
    return storage.join(run_dir, name)
