"""Choosing the index: type by N, dimension and memory budget; IVF lists; PQ code sizes."""

from __future__ import annotations

import pytest

from semclust.errors import UserError
from semclust.index.factory import IndexSpec, auto_nlist, choose_spec, pq_candidates

GiB = 1 << 30


def test_choice_by_size_dimension_and_budget():
    assert choose_spec(50_000, 256, "cosine").kind == "flat"
    assert choose_spec(500_000, 256, "cosine").kind == "hnsw"
    assert choose_spec(500_000, 256, "cosine", gpu=True).kind == "ivf_flat"
    assert choose_spec(500_000, 1024, "cosine").kind == "ivf_flat"  # HNSW builds slowly at 1024-d
    big = choose_spec(10_000_000, 2048, "cosine", memory=8 * GiB)
    assert big.kind == "ivf_pq" and big.memory_bytes(10_000_000) <= 8 * GiB
    for m in (m for m in pq_candidates(2048) if m > big.pq_m):  # the most bytes that fit
        bigger = choose_spec(10_000_000, 2048, "cosine", kind="ivf_pq", pq_m=m)
        assert bigger.memory_bytes(10_000_000) > 8 * GiB
    assert big.pq_m == 512
    assert choose_spec(10_000_000, 2048, "cosine", memory=100 * GiB).kind == "ivf_flat"
    assert auto_nlist(10_000_000) == 16_384 and auto_nlist(1_000) == 25
    with pytest.raises(ValueError, match="no index type fits 10000000 vectors of dimension 2048"):
        choose_spec(10_000_000, 2048, "cosine", memory=64 << 20)
    with pytest.raises(ValueError, match="over the index memory budget"):
        choose_spec(1_000, 64, "cosine", kind="flat", memory=1024)
    with pytest.raises(ValueError, match="must divide"):
        choose_spec(1_000, 64, "cosine", kind="ivf_pq", pq_m=7)


def test_memory_estimates_and_similarities():
    import numpy as np

    flat = IndexSpec("flat", 64, "cosine")
    assert flat.memory_bytes(1_000) == 4 * 64 * 1_000 and flat.inner_product
    ivf = IndexSpec("ivf_pq", 64, "cosine", nlist=16, pq_m=8)
    assert ivf.memory_bytes(1_000) == (8 + 16) * 1_000 + 4 * 64 * 16 + 1024 * 64
    assert ivf.factory == "IVF16,PQ8" and not ivf.inner_product
    # Squared L2 on the unit sphere -> cosine; l2 -> minus the squared distance.
    np.testing.assert_allclose(ivf.to_similarity(np.array([[0.0, 2.0]])), [[1.0, 0.0]])
    l2 = IndexSpec("hnsw", 64, "l2", hnsw_m=16)
    np.testing.assert_allclose(l2.to_similarity(np.array([[3.0]])), [[-3.0]])
    assert pq_candidates(24) == [12, 8, 4, 2, 1]
    with pytest.raises(UserError):
        choose_spec(1_000, 64, "cosine", kind="flat", memory=1024)
