"""How the embed stage shares a cluster out: model actors, their threads, decode tasks at once.

Chosen from the cluster's resources when the run starts, so one default is right on a 2-core
laptop and on a 32-core or multi-GPU cluster; every value can be set in the config instead.

- GPU: one actor per GPU (the pool grows to the cluster's GPUs), TensorFlow's own threads, and
  every other CPU for decoding: a GPU eats thousands of images a second, so decoding is the
  bottleneck to feed.
- CPU: one actor per ``CPUS_PER_ACTOR`` cores (at least one). The model is about ten times the
  work of decoding an image, so each actor's threads take all the cores its share of the
  cluster has, and decode tasks run in the gaps (one per core left unclaimed by the actors):
  on 2 cores, one actor with 2 threads and one decode task. Fewer model threads would leave the
  decode core idle most of the time; fewer decode slots would starve the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semclust.config import EmbedConfig

CPUS_PER_ACTOR = 16  # CPU inference scales well to about this many threads per model call


@dataclass(frozen=True)
class ClusterShape:
    node_cpus: float  # CPUs of the largest alive node
    cluster_cpus: float
    cluster_gpus: float


@dataclass(frozen=True)
class EmbedPlan:
    min_actors: int
    max_actors: int
    threads: int | None  # model threads per actor; None: the framework's own (GPU)
    decoders: int  # decode tasks at once


def cluster_shape() -> ClusterShape:
    """The running Ray cluster's shape."""
    import ray

    alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    node_cpus = max((float(res.get("CPU", 0)) for res in alive), default=0.0)
    total = ray.cluster_resources()
    return ClusterShape(node_cpus, float(total.get("CPU", 0)), float(total.get("GPU", 0)))


def plan(ec: EmbedConfig, gpu: bool, shape: ClusterShape) -> EmbedPlan:
    """The actors, threads and decode concurrency for ``ec`` on a cluster of ``shape``."""
    if gpu:
        auto = max(1, int(shape.cluster_gpus))
        low = ec.num_actors or 1
        high = ec.max_actors or (ec.num_actors or auto)
        threads = ec.threads
    else:
        auto = max(1, round(shape.cluster_cpus / CPUS_PER_ACTOR))
        low = ec.num_actors or auto
        high = ec.max_actors or low
        threads = ec.threads
        if threads is None:
            claim = max(1, math.ceil(ec.actor_num_cpus))
            share = int(shape.cluster_cpus // high)
            threads = max(claim, min(int(shape.node_cpus), share))
    left = shape.cluster_cpus - high * ec.actor_num_cpus
    per_task = ec.decode_num_cpus if ec.decode_num_cpus > 0 else 1.0
    decoders = max(1, int(left // per_task))
    return EmbedPlan(low, max(low, high), threads, decoders)
