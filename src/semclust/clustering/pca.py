"""The rows k-means sees: optional L2 normalisation, PCA and whitening, learned on the sample.

``RowTransform.apply`` maps embeddings float32 (n, D) to model space float32 (n, d): for
spherical k-means the rows are normalised, projected on the top ``d`` principal components
(centred on the sample mean, optionally scaled to unit variance per component) and normalised
again, so that squared L2 distances in model space are ``2 - 2 cos``. Stored as ``model/pca.npz``
when a projection is used.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from semclust.rundir.embeddings import normalize_rows

_COV_CHUNK = 65_536  # rows per covariance block: bounds the float64 temporary


@dataclass(frozen=True)
class RowTransform:
    """Embeddings -> model space. ``mean``/``components`` are None when no PCA is used."""

    spherical: bool
    mean: np.ndarray | None = None  # float32 (D,)
    components: np.ndarray | None = None  # float32 (d, D); rows scaled by 1/sqrt(var) if whiten
    explained_variance: np.ndarray | None = None  # float32 (d,), the kept eigenvalues
    whiten: bool = False

    @property
    def uses_pca(self) -> bool:
        return self.components is not None

    def out_dim(self, in_dim: int) -> int:
        return int(self.components.shape[0]) if self.components is not None else in_dim

    @classmethod
    def fit(
        cls, sample: np.ndarray, pca_dim: int | None, whiten: bool, spherical: bool
    ) -> RowTransform:
        """Learn the transform from float32 (n, D) sample rows (no PCA when neither is asked)."""
        if pca_dim is None and not whiten:
            return cls(spherical=spherical)
        dim = sample.shape[1]
        out = pca_dim or dim
        if out > dim:
            raise ValueError(f"cluster.pca_dim={out} is larger than the embedding dimension {dim}")
        if out > len(sample):
            raise ValueError(
                f"cluster.pca_dim={out} needs at least {out} sample rows, got {len(sample)}"
            )
        x = normalize_rows(sample) if spherical else sample
        mean = x.mean(axis=0, dtype=np.float64)
        cov = np.zeros((dim, dim), dtype=np.float64)
        for s in range(0, len(x), _COV_CHUNK):
            block = x[s : s + _COV_CHUNK].astype(np.float64) - mean
            cov += block.T @ block
        cov /= max(1, len(x) - 1)
        eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigvals)[::-1][:out]
        eigvals = np.maximum(eigvals[order], 0.0)
        components = eigvecs[:, order].T
        if whiten:
            # A floor relative to the top eigenvalue keeps near-null directions from exploding.
            components = components / np.sqrt(eigvals + 1e-6 * max(eigvals[0], 1e-12))[:, None]
        return cls(
            spherical=spherical,
            mean=mean.astype(np.float32),
            components=components.astype(np.float32),
            explained_variance=eigvals.astype(np.float32),
            whiten=whiten,
        )

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float (n, D) embeddings -> float32 (n, d) model-space rows."""
        x = normalize_rows(x) if self.spherical else np.asarray(x, dtype=np.float32)
        if self.components is not None:
            x = (x - self.mean) @ self.components.T
            if self.spherical:
                x = normalize_rows(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_npz(self) -> bytes:
        """``pca.npz``: mean (D,), components (d, D), explained_variance (d,), whiten, spherical."""
        assert self.components is not None
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=self.mean,
            components=self.components,
            explained_variance=self.explained_variance,
            whiten=np.array(self.whiten),
            spherical=np.array(self.spherical),
        )
        return buf.getvalue()

    @classmethod
    def from_npz(cls, raw: bytes) -> RowTransform:
        data = np.load(io.BytesIO(raw))
        return cls(
            spherical=bool(data["spherical"]),
            mean=data["mean"],
            components=data["components"],
            explained_variance=data["explained_variance"],
            whiten=bool(data["whiten"]),
        )
