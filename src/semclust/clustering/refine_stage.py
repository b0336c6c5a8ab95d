"""The refine stage: a clustering head trained on frozen embeddings, ``refine.method`` choosing
SCAN (stage ``refine_scan``, reads ``knn/``) or DEC (``refine_dec``); the work is in ``refine``.

Resume: a head that finished with the same settings on the same embeddings, with every part
in place, is left as it is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from semclust import storage
from semclust.clustering import model as model_files
from semclust.clustering.refine import refine_task
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.index.faiss_ops import node_resources
from semclust.rundir.layout import assignments_of

log = logging.getLogger(__name__)


def settings(ctx: RunContext) -> dict[str, Any]:
    """The refine section and the embeddings' fingerprint; the k-means model must exist (and
    give DEC its k)."""
    rc = ctx.cfg.refine
    shards = ctx.embeddings()
    kmeans_k = int(model_files.read_summary(ctx.run_dir)["k"])
    if rc.method == "dec" and rc.k is not None and rc.k != kmeans_k:
        raise UserError(
            f"refine.k={rc.k}: DEC starts from the k-means centroids, so k is the model's "
            f"({kmeans_k}); leave refine.k unset or re-run `semclust cluster --k {rc.k}`"
        )
    return {"refine": asdict(rc), "embeddings": shards.fingerprint()}


def run(ctx: RunContext) -> dict[str, Any]:
    """Train the head in one Ray task (a GPU when there is one) and write its assignments."""
    from semclust.ray_runtime import use_gpu

    rc = ctx.cfg.refine
    folder = storage.join(ctx.run_dir, assignments_of(rc.method))
    complete = len(storage.list_shards(folder)) == len(ctx.embeddings().uris)
    if ctx.resumable and ctx.previous.get("status") == "done" and complete:
        log.info("refine %s: already done with the same settings", rc.method)
        return ctx.previous
    ray = ctx.start_ray()
    gpu = use_gpu(rc.device)
    cpus, _ = node_resources()
    resources: dict[str, float] = {"num_cpus": float(rc.num_cpus or max(1.0, cpus))}
    if gpu:
        resources["num_gpus"] = 1.0
    ctx.ensure_held()
    record: dict[str, Any] = ray.get(ctx.remote(refine_task, **resources).remote(ctx.run_dir, rc))
    record["device"] = "gpu" if gpu else "cpu"
    return record


def summary(record: dict[str, Any]) -> str:
    return (
        f"k={record['k']}, {record['rows']} rows -> {record['output']}/, "
        f"sizes {record['cluster_sizes']}"
    )
