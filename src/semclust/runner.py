"""Runs stages in order; each stage reads the previous stage's files, not its memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from semclust.config import RunConfig

STAGE_ORDER = ("embed", "cluster", "graph", "index")


def stage_function(name: str) -> Callable[[RunConfig], dict[str, Any]]:
    if name == "embed":
        from semclust.embed.pipeline import run_embed

        return run_embed
    if name == "cluster":
        from semclust.clustering.kmeans import run_cluster

        return run_cluster
    if name == "graph":
        from semclust.clustering.knn import run_graph

        return run_graph
    if name == "index":
        from semclust.index.build import run_index

        return run_index
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_ORDER)}")


def run_all(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """embed -> cluster -> graph -> index; returns each stage's run.json record."""
    return {name: stage_function(name)(cfg) for name in STAGE_ORDER}
