"""The index tests' helpers: the database size, a config and a run of the index stage, and
exact top-10 in float64."""

from __future__ import annotations

import numpy as np

from semclust import runner
from semclust.config import load_config

N, DIM = 20_000, 32


def index_cfg(run_dir, **overrides):
    return load_config(None, {"run_dir": str(run_dir), "mode": "overwrite", **overrides})


def run_index(cfg) -> dict:
    return runner.run_stages(cfg, ["index"])["index"]


def exact_top10(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    db = database / np.linalg.norm(database, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    rows = np.argsort(-sims, axis=1)[:, :10]
    return rows, np.take_along_axis(sims, rows, axis=1)
