"""The k-means model and its files in ``model/``.

- ``centroids.npy``: float32 (k, d) in model space (after ``pca.npz`` when there is one),
- ``pca.npz``: the projection (see ``pca.RowTransform``), only when PCA/whitening is used,
- ``coarse.npz``: two-level models only, coarse centroids (k1, d) and each centroid's parent,
- ``k_selection.json``: with ``k=auto``, the scores of every k tried,
- ``kmeans.json``: the training summary, written last, so its presence marks a complete model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from semclust import storage
from semclust.clustering.pca import RowTransform
from semclust.errors import UserError
from semclust.rundir.layout import MODEL

CENTROIDS = "centroids.npy"
PCA = "pca.npz"
COARSE = "coarse.npz"
K_SELECTION = "k_selection.json"
SUMMARY = "kmeans.json"  # the completion marker


@dataclass(frozen=True)
class KMeansModel:
    """Centroids float32 (k, d) in model space, the transform into it, and the coarse level."""

    transform: RowTransform
    centroids: np.ndarray
    coarse: np.ndarray | None = None  # float32 (k1, d), two-level models only
    parents: np.ndarray | None = None  # int32 (k,), each centroid's coarse cluster

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def save(self, run_dir: str) -> None:
        """Write the model files (not ``kmeans.json``: ``save_summary`` completes the model)."""
        storage.write_bytes(model_file(run_dir, CENTROIDS), _npy(self.centroids))
        if self.transform.uses_pca:
            storage.write_bytes(model_file(run_dir, PCA), self.transform.to_npz())
        if self.coarse is not None:
            buf = io.BytesIO()
            np.savez(buf, centroids=self.coarse, parents=self.parents)
            storage.write_bytes(model_file(run_dir, COARSE), buf.getvalue())

    @classmethod
    def load(cls, run_dir: str) -> tuple[KMeansModel, dict[str, Any]]:
        """The complete model of a run and its ``kmeans.json`` summary."""
        summary = read_summary(run_dir)
        centroids = np.load(io.BytesIO(storage.read_bytes(model_file(run_dir, CENTROIDS))))
        transform = RowTransform(spherical=summary["spherical"])
        if summary.get("pca"):
            transform = RowTransform.from_npz(storage.read_bytes(model_file(run_dir, PCA)))
        coarse = parents = None
        if summary.get("coarse_k"):
            data = np.load(io.BytesIO(storage.read_bytes(model_file(run_dir, COARSE))))
            coarse, parents = data["centroids"], data["parents"]
        return cls(transform, centroids, coarse, parents), summary


def model_file(run_dir: str, name: str) -> str:
    return storage.join(run_dir, MODEL, name)


def is_complete(run_dir: str) -> bool:
    """Whether ``model/`` holds a whole model (its ``kmeans.json`` was written)."""
    return storage.exists(model_file(run_dir, SUMMARY))


def read_summary(run_dir: str) -> dict[str, Any]:
    """``model/kmeans.json``; a run without a complete model raises ``UserError``."""
    if not is_complete(run_dir):
        raise UserError(f"{run_dir!r} has no complete k-means model: run `semclust cluster`")
    summary: dict[str, Any] = storage.read_json(model_file(run_dir, SUMMARY))
    return summary


def save_summary(run_dir: str, summary: dict[str, Any]) -> None:
    """Write ``kmeans.json``, after every other model file: the model is complete from here."""
    storage.write_json(model_file(run_dir, SUMMARY), summary)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
