"""How good are the clusters and labels (``semclust evaluate``): ``scores`` (arrays in, numbers
out), ``metrics`` (a run directory in, ``metrics.json`` out), ``stage`` (the stage contract)."""

from semclust.evaluate.metrics import HEADS, available_assignments, evaluate_run, headline
from semclust.evaluate.scores import (
    cluster_accuracy,
    clustering_scores,
    cosine_silhouette,
    hungarian_match,
    per_class_scores,
    purity,
    seed_stability,
    size_balance,
    truth_from_folders,
)

__all__ = [
    "HEADS",
    "available_assignments",
    "cluster_accuracy",
    "clustering_scores",
    "cosine_silhouette",
    "evaluate_run",
    "headline",
    "hungarian_match",
    "per_class_scores",
    "purity",
    "seed_stability",
    "size_balance",
    "truth_from_folders",
]
