"""Assignment of every embeddings shard to the k-means model, in Ray actors.

Each actor loads the model from the run directory once (never an object pickled from the
driver) and writes ``assignments/part-NNNNN.parquet`` (the part number of its embeddings shard)
with ``image_id``, ``cluster``/``distance`` (nearest centroid) and ``cluster_2nd``/
``distance_2nd``; a part is written whole or not at all, so a re-run redoes only missing parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust import storage
from semclust.clustering.kmeans import CentroidAssigner
from semclust.clustering.model import KMeansModel
from semclust.config import ClusterConfig
from semclust.index.faiss_ops import remote_options, resolve_gpus, set_threads
from semclust.rundir.embeddings import read_checked
from semclust.rundir.tables import assignments_table

if TYPE_CHECKING:
    from semclust.context import RunContext


class AssignActor:
    """Holds one model (loaded from the run directory) and assigns whole shards with it."""

    def __init__(self, run_dir: str, device: str, nprobe: int, threads: float) -> None:
        set_threads(threads)
        self.model, summary = KMeansModel.load(run_dir)
        self.dim = summary["dim"]
        gpus = resolve_gpus(device, "cluster assignment")
        self.assigner = CentroidAssigner(self.model, gpus=gpus, nprobe=nprobe)

    def assign_shard(self, shard_uri: str, out_uri: str) -> dict[str, Any]:
        """Read one embeddings shard, write its assignments part; its rows and cluster sizes."""
        return assign_shard(self.assigner, shard_uri, out_uri, self.dim)


def assign_shard(
    assigner: CentroidAssigner, shard_uri: str, out_uri: str, dim: int
) -> dict[str, Any]:
    """Assign one shard with ``assigner`` and write its assignments part atomically."""
    ids, vectors = read_checked(shard_uri, dim)
    labels, distances = assigner.assign(vectors)
    storage.write_parquet(out_uri, assignments_table(ids, labels, distances))
    return {"rows": len(ids), "sizes": np.bincount(labels[:, 0], minlength=assigner.model.k)}


def num_actors(requested: int | None, per_actor_cpus: float, gpu: bool, jobs: int) -> int:
    """Actors to start: ``requested``, else one per GPU or per ``per_actor_cpus`` CPUs of the
    cluster; never more than there are ``jobs``."""
    import ray

    if requested is None:
        res = ray.cluster_resources()
        requested = int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1) // per_actor_cpus)
    return max(1, min(requested, jobs))


def assign_shards(
    ctx: RunContext,
    cc: ClusterConfig,
    k: int,
    shard_uris: list[str],
    out_uri: Callable[[str], str],
    gpu: bool,
) -> tuple[np.ndarray, int]:
    """Assign ``shard_uris`` in a pool of actors, each part written to ``out_uri(shard)``.

    Returns (cluster sizes int64 (k,) over those shards, rows assigned). The actors are killed
    at the end, also after a failure, so that the next stage gets their CPUs and GPUs.
    """
    from ray.util import ActorPool

    ray = ctx.start_ray()
    actor_cls = ctx.remote(
        AssignActor, **remote_options(num_cpus=cc.actor_num_cpus, num_gpus=1 if gpu else 0)
    )
    count = num_actors(cc.num_actors, cc.actor_num_cpus, gpu, len(shard_uris))
    actors = [
        actor_cls.remote(ctx.run_dir, cc.device, cc.assign_nprobe, cc.actor_num_cpus)
        for _ in range(count)
    ]
    sizes = np.zeros(k, dtype=np.int64)
    rows = 0
    try:
        for result in ActorPool(actors).map_unordered(
            lambda a, u: a.assign_shard.remote(u, out_uri(u)), shard_uris
        ):
            sizes += result["sizes"]
            rows += result["rows"]
    finally:
        for actor in actors:
            ray.kill(actor)
    return sizes, rows
