"""k=auto on arrays: candidate k, the elbow, the silhouette-then-elbow rule, and a planted k."""

from __future__ import annotations

import numpy as np
import pytest

from semclust.clustering.select_k import (
    choose_k,
    elbow,
    k_candidates,
    pairwise_distances,
    select_k,
)
from semclust.config import ClusterConfig
from tests.clustering.synthetic import planted


def test_candidates_and_elbow():
    assert k_candidates(2, 12, 16, 1000) == list(range(2, 13))
    many = k_candidates(2, 1000, 8, 100_000)
    assert len(many) == 8 and many[0] == 2 and many[-1] == 1000
    assert k_candidates(2, 50, 16, 6) == [2, 3, 4, 5]  # never more than n - 1
    with pytest.raises(ValueError, match="needs more rows than k_min=5"):
        k_candidates(5, 10, 4, 5)
    assert elbow([2, 3, 4, 5, 6], [100.0, 50.0, 10.0, 9.0, 8.5]) == 4
    assert elbow([2, 3], [10.0, 5.0]) is None
    assert elbow([2, 3, 4], [1.0, 1.0, 1.0]) is None


def test_rule_prefers_the_elbow_among_near_best_silhouettes():
    rows = [
        {"k": 2, "objective": 100.0, "silhouette": 0.50},
        {"k": 3, "objective": 40.0, "silhouette": 0.61},
        {"k": 4, "objective": 12.0, "silhouette": 0.60},  # the elbow, 0.01 under the best
        {"k": 5, "objective": 11.0, "silhouette": 0.40},
        {"k": 6, "objective": 10.5, "silhouette": 0.30},
    ]
    choice = choose_k(rows)
    assert choice["best_silhouette_k"] == 3 and choice["elbow_k"] == 4
    assert choice["chosen_k"] == 4
    rows[2]["silhouette"] = 0.55  # now too far under the best: the best silhouette wins
    assert choose_k(rows)["chosen_k"] == 3


def test_pairwise_distances():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    d = pairwise_distances(x)
    np.testing.assert_allclose(d, [[0, 5, 1], [5, 0, np.sqrt(18)], [1, np.sqrt(18), 0]])


def test_select_k_finds_the_planted_k():
    x, _, _ = planted(6_000, 5, 16, noise=0.4, seed=9)
    cc = ClusterConfig(k="auto", k_min=2, k_max=9, silhouette_sample=1_500)
    k, table = select_k(x, cc)
    assert k == 5 and table["chosen_k"] == 5
    assert [r["k"] for r in table["candidates"]] == list(range(2, 10))
    assert table["sample_rows"] == 6_000 and table["silhouette_rows"] == 1_500
    objectives = [r["objective"] for r in table["candidates"]]
    assert objectives[0] > objectives[3]  # more clusters, lower objective
