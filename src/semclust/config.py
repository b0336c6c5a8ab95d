"""Run configuration: one frozen dataclass per stage, nested in a RunConfig.

Loaded from YAML, overridden by CLI flags (dotted keys such as ``embed.batch_size=64``), and
validated on construction: a bad value raises ``ValueError`` naming the allowed values, so a run
stops before any work is done.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEVICES = ("auto", "cpu", "gpu")
MODES = ("resume", "overwrite")
RESIZE_MODES = ("center_crop", "squash", "pad")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
GRAPH_METRICS = ("cosine", "l2")
GRAPH_METHODS = ("auto", "exact", "ivf", "hnsw")
INDEX_TYPES = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
CLUSTER_INITS = ("kmeans++", "random")
HIERARCHICAL = ("auto", "on", "off")
REFINE_METHODS = ("scan", "dec")
LABEL_ASSIGNMENTS = ("kmeans", "scan", "dec", "auto")
SEED_METHODS = ("auto", "head", "propagation", "blend")
PRECISIONS = ("auto", "float32", "mixed")

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?$")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def parse_bytes(text: str | int, name: str = "size") -> int:
    """Bytes in a size such as ``8GB``, ``512MiB``, ``1.5G`` or ``1000000``.

    K, M, G and T are binary multiples (``8GB`` and ``8GiB`` are both 8 x 2**30 bytes), as memory
    sizes are usually meant.
    """
    match = _SIZE_RE.match(str(text).strip().upper())
    value = float(match.group(1)) * _BYTE_UNITS[match.group(2)] if match else 0.0
    if isinstance(text, bool) or value < 1:
        raise ValueError(
            f"{name}={text!r} is not a size; write a positive number with an optional unit, "
            "e.g. 8GB, 512MB, 1.5G"
        )
    return int(value)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


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
    backbone: str = "resnet50"
    # "imagenet" (Keras download/cache), "random" (seeded), "default" (the backbone's packaged
    # weights, efficientnet_lite0 only), or a path to a weights / .keras / .pth file.
    weights: str = "imagenet"
    image_size: int | None = None  # None: the backbone's native input size
    resize: str = "center_crop"
    normalize: bool = True  # L2-normalise embeddings
    batch_size: int = 32  # images per model call
    decode_batch_size: int = 64  # images per decode task batch
    num_actors: int = 1  # minimum size of the model actor pool
    max_actors: int | None = None  # autoscaling bound; None = num_actors
    actor_num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    device: str = "auto"
    keras_backend: str = "tensorflow"
    rows_per_part: int = 50_000  # rows per embeddings/ shard
    max_image_pixels: int = 178_956_970  # decompression-bomb limit (Pillow's default x2)
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
        for name in ("batch_size", "decode_batch_size", "num_actors", "rows_per_part"):
            _positive(f"embed.{name}", getattr(self, name))
        _positive("embed.max_image_pixels", self.max_image_pixels)
        _positive("embed.actor_num_cpus", self.actor_num_cpus, allow_zero=True)
        _positive("embed.decode_num_cpus", self.decode_num_cpus, allow_zero=True)
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"embed.image_size must be >= 32, got {self.image_size}")
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(
                f"embed.max_actors ({self.max_actors}) must be >= embed.num_actors "
                f"({self.num_actors})"
            )
        # Imported late: the registry imports nothing heavy, but keeps config free of cycles.
        from semclust.embed.backbones import BACKBONES

        _choice("embed.backbone", self.backbone, tuple(sorted(BACKBONES)))


@dataclass(frozen=True)
class ClusterConfig:
    """embeddings/ -> model/ and assignments/ (FAISS k-means, trained on a sample)."""

    k: int | str = 100  # an integer >= 2, or "auto" (chosen from k_min..k_max on a sample)
    k_min: int = 2  # k=auto: smallest k tried
    k_max: int = 50  # k=auto: largest k tried
    k_candidates: int = 16  # k=auto: at most this many values of k, spread geometrically
    k_sample: int = 20_000  # k=auto: rows each candidate is trained on
    silhouette_sample: int = 4_000  # k=auto: rows the silhouette is computed on
    niter: int = 20
    spherical: bool = True
    init: str = "kmeans++"
    nredo: int = 1  # restarts; the best objective is kept
    max_points_per_centroid: int = 256  # training sample is at most this x k rows
    max_sample_memory: str = "4GB"  # and never larger than this (float32 rows)
    pca_dim: int | None = None  # e.g. 256: k-means runs on the top principal components
    whiten: bool = False  # scale each principal component to unit variance
    hierarchical: str = "auto"  # two-level k-means: on, off, or auto (k >= hierarchical_min_k)
    hierarchical_min_k: int = 10_000
    assign_nprobe: int = 16  # two-level model on CPU: coarse clusters searched per row
    seed: int = 1234
    device: str = "auto"
    num_actors: int | None = None  # assignment actors; None = one per GPU, else one per CPU
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

    k: int = 10
    metric: str = "cosine"
    method: str = "auto"  # exact | ivf | hnsw | auto (exact up to exact_max_rows, else ivf)
    exact_max_rows: int | None = None  # None: 4,000,000 with a GPU, 50,000 on CPU
    nlist: int | None = None  # IVF lists; None: about 4 sqrt(N)
    nprobe: int = 32  # IVF lists visited per query
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    fp16: bool = False  # GPU only: store the exact index's vectors in float16
    num_actors: int | None = None  # query actors; None = one per GPU, else 1
    actor_num_cpus: float | None = None  # None: the cluster's CPUs shared among the actors
    query_batch_size: int = 4096
    device: str = "auto"
    recall_sample: int = 1000  # queries on which an approximate graph is checked against exact
    min_recall: float | None = 0.9  # an approximate graph below this recall@k fails the stage
    duplicate_threshold: float | None = 0.97  # edges with similarity >= this join a group
    max_train_memory: str = "2GB"  # IVF training sample cap (float32 rows)

    def __post_init__(self) -> None:
        for name in ("k", "nprobe", "hnsw_m", "ef_construction", "ef_search", "query_batch_size"):
            _positive(f"graph.{name}", getattr(self, name))
        for name in ("num_actors", "actor_num_cpus", "nlist", "exact_max_rows"):
            if getattr(self, name) is not None:
                _positive(f"graph.{name}", getattr(self, name))
        _positive("graph.recall_sample", self.recall_sample, allow_zero=True)
        if self.min_recall is not None and not 0 <= self.min_recall <= 1:
            raise ValueError(f"graph.min_recall must be in [0, 1], got {self.min_recall}")
        parse_bytes(self.max_train_memory, "graph.max_train_memory")
        _choice("graph.metric", self.metric, GRAPH_METRICS)
        _choice("graph.method", self.method, GRAPH_METHODS)
        _choice("graph.device", self.device, DEVICES)


@dataclass(frozen=True)
class IndexConfig:
    """embeddings/ -> index/ (a FAISS index sized to N, the dimension and a memory budget)."""

    type: str = "auto"  # auto | flat | ivf_flat | ivf_pq | hnsw
    metric: str = "cosine"
    memory: str | None = None  # budget for the index in memory, e.g. "8GB"; None = no limit
    flat_max_rows: int = 100_000  # auto: flat (exact) up to this many rows
    hnsw_max_rows: int = 1_000_000  # auto, CPU: HNSW up to this many rows ...
    hnsw_max_dim: int = 512  # ... and dimensions (its build slows with both)
    nlist: int | None = None  # IVF lists; None: about 4 sqrt(N)
    nprobe: int = 16  # default IVF lists visited per query (search can override)
    pq_m: int | None = None  # IVF-PQ bytes per vector; None: the largest that fits the budget
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64  # default HNSW search depth (search can override)
    train_points_per_list: int = 64  # IVF training sample: this x nlist rows ...
    max_train_memory: str = "2GB"  # ... and never more than this
    recall_sample: int = 500  # queries on which recall@10 is measured and recorded
    seed: int = 1234
    device: str = "auto"
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
            "nprobe",
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "train_points_per_list",
        ):
            _positive(f"index.{name}", getattr(self, name))
        for name in ("nlist", "pq_m", "num_cpus"):
            if getattr(self, name) is not None:
                _positive(f"index.{name}", getattr(self, name))
        _positive("index.recall_sample", self.recall_sample, allow_zero=True)


@dataclass(frozen=True)
class RefineConfig:
    """embeddings/ + knn/ + model/ -> assignments_scan/ or assignments_dec/."""

    method: str = "scan"  # scan | dec
    k: int | None = None  # clusters; None = the k-means model's k (DEC always uses it)
    seed: int = 1234
    device: str = "auto"  # auto | cpu | gpu (TensorFlow on the task's GPU)
    num_cpus: float | None = None  # the training task; None = every CPU of the largest node
    batch_size: int = 512  # rows (SCAN: anchor-neighbour pairs) per step
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    # SCAN
    epochs: int = 30  # SCAN epochs (one epoch = one pair per row)
    num_neighbors: int = 20  # neighbours a pair is drawn from (at most the graph's k)
    heads: int = 5  # heads trained at once; the lowest loss is kept
    warm_start_epochs: int = 0  # epochs fitting the heads to k-means first; 0 = random start
    hidden: int = 512  # width of the shared hidden layer; 0 = linear heads
    entropy_weight: float = 5.0
    input_dropout: float = 0.2  # feature dropout: the augmentation of frozen embeddings
    feature_noise: float = 0.0  # std of Gaussian noise added to the (unit-norm) input rows
    self_label_epochs: int = 5  # 0 skips self-labelling
    confidence_threshold: float = 0.99  # self-labelling trains on rows at least this confident
    # DEC
    dec_max_epochs: int = 50  # passes over the data at most
    dec_update_interval: int | None = None  # steps between target updates; None = one epoch
    dec_tolerance: float = 0.001  # stop when fewer than this fraction of rows change cluster
    dec_alpha: float = 1.0  # Student's t degrees of freedom
    dec_learning_rate: float = 0.01  # SGD with momentum 0.9, as in the paper
    dec_encoder: bool = False  # a trainable linear map (identity at first) before the centroids

    def __post_init__(self) -> None:
        _choice("refine.method", self.method, REFINE_METHODS)
        _choice("refine.device", self.device, DEVICES)
        if self.k is not None and self.k < 2:
            raise ValueError(f"refine.k must be >= 2 (or None for the k-means k), got {self.k}")
        for name in (
            "batch_size",
            "learning_rate",
            "epochs",
            "num_neighbors",
            "heads",
            "entropy_weight",
            "dec_max_epochs",
            "dec_alpha",
            "dec_learning_rate",
        ):
            _positive(f"refine.{name}", getattr(self, name))
        for name in (
            "weight_decay",
            "hidden",
            "self_label_epochs",
            "feature_noise",
            "warm_start_epochs",
        ):
            _positive(f"refine.{name}", getattr(self, name), allow_zero=True)
        for name in ("num_cpus", "dec_update_interval"):
            if getattr(self, name) is not None:
                _positive(f"refine.{name}", getattr(self, name))
        if not 0 <= self.input_dropout < 1:
            raise ValueError(f"refine.input_dropout must be in [0, 1), got {self.input_dropout}")
        if not 0 < self.confidence_threshold < 1:
            raise ValueError(
                f"refine.confidence_threshold must be in (0, 1), got {self.confidence_threshold}"
            )
        if not 0 <= self.dec_tolerance < 1:
            raise ValueError(f"refine.dec_tolerance must be in [0, 1), got {self.dec_tolerance}")


@dataclass(frozen=True)
class LabelConfig:
    """embeddings/ + knn/ + assignments -> labels/."""

    refs: str | None = None  # folder/prefix with one sub-folder of example images per class
    seed_labels: str | None = None  # Parquet/CSV with uri,label for a small labelled subset
    names: str | None = None  # YAML cluster id -> name
    # Which clusters are labelled/named: k-means (assignments/), a head, or auto (the refined
    # SCAN ones if present, then DEC, then k-means).
    assignments: str = "kmeans"
    min_confidence: float = 0.0  # a label with a lower confidence becomes "unknown"
    # refs
    vote_k: int = 10  # graph neighbours in each image's vote
    unknown_threshold: float | None = None  # one cosine for all classes; None: per class, auto
    unknown_position: float = 0.5  # auto threshold: 0 = background level, 1 = the refs' own
    # seed labels
    method: str = "auto"  # auto | head | propagation | blend
    cv_folds: int = 5
    head_epochs: int = 100
    head_hidden: int = 0  # 0 = a linear softmax head
    head_dropout: float = 0.2
    head_weight_decay: float = 1e-2
    propagation_alpha: float = 0.9
    propagation_iterations: int = 20
    max_propagation_memory: str = "4GB"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refs is not None and self.seed_labels is not None:
            raise ValueError("label takes --refs or --seed-labels, not both")
        _choice("label.assignments", self.assignments, LABEL_ASSIGNMENTS)
        _choice("label.method", self.method, SEED_METHODS)
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"label.min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.unknown_threshold is not None and not -1 <= self.unknown_threshold <= 1:
            raise ValueError(
                f"label.unknown_threshold must be a cosine in [-1, 1], got {self.unknown_threshold}"
            )
        if not 0 <= self.unknown_position <= 1:
            raise ValueError(
                f"label.unknown_position must be in [0, 1], got {self.unknown_position}"
            )
        if not 0 < self.propagation_alpha < 1:
            raise ValueError(
                f"label.propagation_alpha must be in (0, 1), got {self.propagation_alpha}"
            )
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"label.head_dropout must be in [0, 1), got {self.head_dropout}")
        for name in ("vote_k", "head_epochs", "propagation_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"label.{name} must be >= 1, got {getattr(self, name)}")
        if self.cv_folds < 2:
            raise ValueError(f"label.cv_folds must be >= 2, got {self.cv_folds}")
        if self.head_hidden < 0 or self.head_weight_decay < 0:
            raise ValueError("label.head_hidden and label.head_weight_decay must be >= 0")
        parse_bytes(self.max_propagation_memory, "label.max_propagation_memory")


@dataclass(frozen=True)
class RunConfig:
    run_dir: str | None = None
    mode: str = "resume"
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if nullable and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        # Try each member in declared order (``int | str`` keeps 12 an int and "auto" a str).
        first_error: ValueError | None = None
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except ValueError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"allowed: {', '.join(names)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config section '{prefix}{name}' must be a mapping")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build a validated RunConfig from an optional YAML file and dotted-key overrides.

    Overrides win over the file; both are checked against the dataclasses, so an unknown key or a
    bad value stops with a message naming what is allowed.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")


def replace(cfg: RunConfig, **dotted: Any) -> RunConfig:
    """A copy of ``cfg`` with dotted keys replaced (``replace(cfg, **{"cluster.k": 5})``)."""
    tree = cfg.to_dict()
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")
