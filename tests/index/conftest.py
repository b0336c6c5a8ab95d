"""The index tests' data: seeded database rows, fresh query rows from the same planted
clusters, and a run directory holding the database as embeddings."""

from __future__ import annotations

import pytest

from tests.clustering.synthetic import planted, write_run
from tests.index.helpers import DIM, N


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Database rows, fresh query rows from the same planted clusters, and a run directory."""
    x, _, _ = planted(N + 300, 100, DIM, noise=0.6, seed=21)
    run_dir = tmp_path_factory.mktemp("index") / "run"
    ids = write_run(run_dir, x[:N], rows_per_part=5_000)
    return run_dir, x[:N], x[N:], ids
