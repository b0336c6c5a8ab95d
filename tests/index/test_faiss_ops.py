"""FAISS plumbing: device resolution, threads, search parameters, the nearest-two search, and
storing and loading indexes (local and on the test S3 server), and Ray resources."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from semclust.index import faiss_ops
from semclust.index.faiss_ops import (
    FAISS_WORKER_ENV,
    claimed_cpus,
    load_index,
    nearest_two,
    remote_options,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    task_resources,
)


def _data(n: int = 2_000, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_devices_without_a_gpu(monkeypatch):
    monkeypatch.setattr(faiss_ops, "faiss_gpu_count", lambda: 0)
    assert resolve_gpus("cpu", "test") == 0
    assert resolve_gpus("auto", "test") == 0
    with pytest.raises(RuntimeError, match="device=gpu was asked for, but FAISS sees no GPU"):
        resolve_gpus("gpu", "test")
    monkeypatch.setattr(faiss_ops, "faiss_gpu_count", lambda: 2)
    assert resolve_gpus("auto", "test") == 2 and resolve_gpus("cpu", "test") == 0


def test_threads():
    assert set_threads(3.0) == 3 and faiss.omp_get_max_threads() == 3
    assert set_threads(0.5) == 1  # a fractional claim still gets one thread
    assert set_threads(None) >= 1
    assert claimed_cpus() is None  # outside a Ray task


def test_nearest_two_in_batches_equals_one_search():
    x, centroids = _data(), _data(50, seed=1)
    index = faiss.IndexFlatL2(8)
    index.add(centroids)
    labels, dist = nearest_two(index, x, batch=300)
    d, i = index.search(x, 2)
    np.testing.assert_array_equal(labels, i)
    np.testing.assert_allclose(dist, d)
    brute = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels[:, 0], np.argmin(brute, axis=1))


def test_search_parameters_reach_ivf_and_hnsw():
    x = _data()
    ivf = faiss.index_factory(8, "IVF16,Flat")
    ivf.train(x)
    set_search_params(ivf, nprobe=7, ef_search=99)  # efSearch means nothing to an IVF
    assert faiss.extract_index_ivf(ivf).nprobe == 7
    hnsw = faiss.index_factory(8, "HNSW8,Flat")
    set_search_params(hnsw, nprobe=7, ef_search=99)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 99


def test_store_and_load_an_index(tmp_path):
    x = _data()
    index = faiss.IndexFlatIP(8)
    index.add(x)
    uri = str(tmp_path / "deep" / "index.faiss")
    size = store_index(index, uri)
    assert size == (tmp_path / "deep" / "index.faiss").stat().st_size > 4 * x.size
    assert not [p for p in (tmp_path / "deep").iterdir() if p.name.startswith(".tmp")]
    loaded = load_index(uri)
    assert loaded.ntotal == 2_000
    np.testing.assert_array_equal(loaded.search(x[:5], 3)[1], index.search(x[:5], 3)[1])


def test_store_and_load_an_index_on_object_storage(s3_bucket):
    x = _data()
    index = faiss.IndexFlatL2(8)
    index.add(x)
    uri = f"s3://{s3_bucket}/run/index/index.faiss"
    assert store_index(index, uri) > 4 * x.size
    np.testing.assert_array_equal(load_index(uri).search(x[:5], 2)[1], index.search(x[:5], 2)[1])


def test_ray_resources(ray_local):
    assert remote_options(num_cpus=2) == {
        "num_cpus": 2,
        "runtime_env": {"env_vars": FAISS_WORKER_ENV},
    }
    assert FAISS_WORKER_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}
    cpus, gpus = faiss_ops.node_resources()
    assert cpus == 2 and gpus == 0  # the session's local Ray
    claim = task_resources("cpu", None)
    assert claim["num_cpus"] == 2.0 and "num_gpus" not in claim  # every CPU of the node
    assert task_resources("auto", 1.5)["num_cpus"] == 1.5

    @ray_local.remote(num_cpus=1)
    def claimed() -> float | None:
        return claimed_cpus()

    assert ray_local.get(claimed.remote()) == 1.0
