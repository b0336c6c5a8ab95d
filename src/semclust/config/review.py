"""Config sections of the stages around a run: refine, label, evaluate, report."""

from __future__ import annotations

from dataclasses import dataclass

from semclust.config.values import (
    DEVICES,
    LABEL_ASSIGNMENTS,
    REFINE_METHODS,
    SEED_METHODS,
    _choice,
    _positive,
    flag,
    parse_bytes,
)


@dataclass(frozen=True)
class RefineConfig:
    """embeddings/ + knn/ + model/ -> assignments_scan/ or assignments_dec/."""

    method: str = flag("scan", "--method", "scan (default) | dec")  # scan | dec
    # clusters; None = the k-means model's k (DEC always uses it)
    k: int | None = flag(None, "--k", "clusters (default: the k-means model's k)")
    seed: int = flag(1234, "--seed", "training seed")
    # auto | cpu | gpu (TensorFlow on the task's GPU)
    device: str = flag("auto", "--refine-device", "auto | cpu | gpu")
    num_cpus: float | None = None  # the training task; None = every CPU of the largest node
    # rows (SCAN: anchor-neighbour pairs) per step
    batch_size: int = flag(512, "--batch-size", "rows (SCAN: pairs) per step (512)")
    learning_rate: float = flag(1e-3, "--learning-rate", "Adam learning rate (SCAN)")
    weight_decay: float = 1e-4
    # SCAN
    # SCAN epochs (one epoch = one pair per row)
    epochs: int = flag(30, "--epochs", "SCAN training epochs (default 30)")
    # neighbours a pair is drawn from (at most the graph's k)
    num_neighbors: int = flag(20, "--num-neighbors", "SCAN: graph neighbours per row (20)")
    # heads trained at once; the lowest loss is kept
    heads: int = flag(5, "--heads", "SCAN heads trained at once; the lowest loss is kept")
    warm_start_epochs: int = 0  # epochs fitting the heads to k-means first; 0 = random start
    # width of the shared hidden layer; 0 = linear heads
    hidden: int = flag(512, "--hidden", "width of the shared hidden layer (0: linear heads)")
    entropy_weight: float = flag(5.0, "--entropy-weight", "SCAN balance term weight (5.0)")
    input_dropout: float = 0.2  # feature dropout: the augmentation of frozen embeddings
    feature_noise: float = 0.0  # std of Gaussian noise added to the (unit-norm) input rows
    # 0 skips self-labelling
    self_label_epochs: int = flag(5, "--self-label-epochs", "SCAN self-labelling (0: skip)")
    # self-labelling trains on rows at least this confident
    confidence_threshold: float = flag(
        0.99,
        "--confidence-threshold",
        "self-labelling trains on rows at least this confident (0.99)",
    )
    # DEC
    # passes over the data at most
    dec_max_epochs: int = flag(50, "--dec-max-epochs", "DEC passes over the data at most")
    dec_update_interval: int | None = None  # steps between target updates; None = one epoch
    # stop when fewer than this fraction of rows change cluster
    dec_tolerance: float = flag(0.001, "--dec-tolerance", "DEC stops below this change rate")
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

    # folder/prefix with one sub-folder of example images per class
    refs: str | None = flag(
        None, "--refs", "folder/URI with one sub-folder of example images per class"
    )
    # Parquet/CSV with uri,label for a small labelled subset
    seed_labels: str | None = flag(
        None, "--seed-labels", "Parquet/CSV of uri,label (labelled subset)"
    )
    # YAML cluster id -> name
    names: str | None = flag(None, "--names", "YAML mapping cluster id -> name")
    # Which clusters are labelled/named: k-means (assignments/), a head, or auto (the refined
    # SCAN ones if present, then DEC, then k-means).
    assignments: str = flag(
        "kmeans",
        "--assignments",
        "clusters to label or name: kmeans (default) | scan | dec | auto (best present)",
    )
    # a label with a lower confidence becomes "unknown"
    min_confidence: float = flag(0.0, "--min-confidence", "lower confidence -> unknown")
    # refs
    # graph neighbours in each image's vote
    vote_k: int = flag(10, "--vote-k", "refs: graph neighbours in each image's vote (10)")
    # one cosine for all classes; None: per class, auto
    unknown_threshold: float | None = flag(
        None,
        "--unknown-threshold",
        "refs: cosine under which an image is unknown (default: per class, automatic)",
    )
    unknown_position: float = 0.5  # auto threshold: 0 = background level, 1 = the refs' own
    # seed labels
    # auto | head | propagation | blend
    method: str = flag(
        "auto",
        "--label-method",
        "seed labels: auto (best cross-validated) | head | propagation | blend",
    )
    cv_folds: int = flag(5, "--cv-folds", "seed labels: cross-validation folds (5)")
    head_epochs: int = 100
    head_hidden: int = 0  # 0 = a linear softmax head
    head_dropout: float = 0.2
    head_weight_decay: float = 1e-2
    propagation_alpha: float = 0.9
    propagation_iterations: int = 20
    max_propagation_memory: str = "4GB"
    seed: int = flag(0, "--label-seed", "seed of the head and the folds")

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
class EvaluateConfig:
    """metrics.json: scores against known classes (when there are any) and label-free scores."""

    truth: str = flag(
        "folder-names",
        "--truth",
        "folder-names (class = parent folder), a Parquet/CSV file with uri,label, or none "
        "(label-free scores only)",
    )
    silhouette_sample: int = flag(5000, "--silhouette-sample", "rows in the silhouette sample")
    stability_seeds: int = flag(3, "--stability-seeds", "k-means seeds compared")
    retrieval_queries: int = flag(1000, "--retrieval-queries", "queries of the retrieval score")
    seed: int = flag(0, "--eval-seed", "seed of the samples")

    def __post_init__(self) -> None:
        for name in ("silhouette_sample", "retrieval_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.stability_seeds < 0:
            raise ValueError(f"evaluate.stability_seeds must be >= 0, got {self.stability_seeds}")


PROJECTIONS = ("auto", "pca", "umap")


@dataclass(frozen=True)
class ReportConfig:
    """What the HTML report shows and how much of it; every number bounds the driver's work."""

    out: str | None = flag(
        None, "--out", "report folder or s3:// prefix (default: <run-dir>/report)"
    )
    nearest: int = flag(12, "--nearest", "images nearest each centroid (12)")
    sample: int = flag(12, "--sample", "seeded random members per cluster (12)")
    clusters_per_page: int = flag(50, "--clusters-per-page", "cluster galleries per page (50)")
    map_sample: int = flag(5000, "--map-sample", "embeddings on the 2-D map, 0 for none (5000)")
    projection: str = flag(
        "auto",
        "--projection",
        "2-D map: auto (UMAP when umap-learn is installed, else PCA), pca, umap",
    )
    neighbours: int = 3  # nearest other clusters listed per cluster
    thumb_size: int = 192  # longest side of a thumbnail, pixels
    thumbs_per_task: int = 64  # thumbnails made by one Ray task
    max_failures: int = 1000  # failure rows listed (all are counted)
    max_duplicate_groups: int = 200  # near-duplicate groups shown (largest first)
    duplicates_per_group: int = 8  # thumbnails per near-duplicate group
    seed: int = flag(0, "--report-seed", "seed of the samples (0)")

    def __post_init__(self) -> None:
        _choice("report.projection", self.projection, PROJECTIONS)
        for name in ("clusters_per_page", "thumb_size", "thumbs_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "nearest",
            "sample",
            "map_sample",
            "neighbours",
            "max_failures",
            "max_duplicate_groups",
            "duplicates_per_group",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"report.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.thumb_size < 16:
            raise ValueError(f"report.thumb_size must be >= 16, got {self.thumb_size}")


@dataclass(frozen=True)
class AddConfig:
    """``semclust add``: images added to a finished run, its clusters, graph and index kept."""

    drift_quantile: float = 0.99  # of the run's own distances to their centroid
    drift_threshold: float = flag(
        0.05,
        "--drift-threshold",
        "share of added images farther from their centroid than the run's own "
        "drift_quantile past which re-clustering is advised (0.05)",
    )
    min_cluster_rows: int = 50  # a cluster's own quantile needs this many rows, else the run's
    # The added rows' kNN edges: exact against every row, or within their nearest clusters;
    # auto: exact for an exact graph or when that costs under about half a minute.
    graph_search: str = "auto"
    report: bool = flag(True, "--no-report", "do not rebuild the report after adding", const=False)

    def __post_init__(self) -> None:
        if not 0.5 <= self.drift_quantile < 1:
            raise ValueError(f"add.drift_quantile must be in [0.5, 1), got {self.drift_quantile}")
        if not 0 < self.drift_threshold <= 1:
            raise ValueError(f"add.drift_threshold must be in (0, 1], got {self.drift_threshold}")
        _choice("add.graph_search", self.graph_search, ("auto", "exact", "clusters"))
        if self.min_cluster_rows < 1:
            raise ValueError(f"add.min_cluster_rows must be >= 1, got {self.min_cluster_rows}")
