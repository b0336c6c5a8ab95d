"""Concurrent searches merged into one FAISS call give each caller exactly its own answer."""

from __future__ import annotations

import threading
import time

import faiss
import numpy as np
import pytest

from semclust.serve.batching import SearchBatcher


def _index(seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2_000, 32)).astype(np.float32)
    index = faiss.IndexFlatL2(32)
    index.add(x)
    return index, rng.standard_normal((40, 32)).astype(np.float32)


def test_merged_searches_answer_each_caller_as_alone():
    index, queries = _index()
    calls = []

    def search(vectors: np.ndarray, k: int) -> list[list[int]]:
        calls.append(len(vectors))
        time.sleep(0.05)  # a slow search, so that the others queue behind it
        return index.search(vectors, k)[1].tolist()

    batcher = SearchBatcher(search)
    got: dict[int, list[list[int]]] = {}

    def client(i: int) -> None:
        got[i] = batcher.search(queries[2 * i : 2 * i + 2], 3 + i % 4)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(20):
        k = 3 + i % 4
        assert got[i] == index.search(queries[2 * i : 2 * i + 2], k)[1].tolist()
    assert sum(calls) == 40 and len(calls) < 20 and batcher.largest_batch > 2


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    index, queries = _index(1)
    fail = threading.Event()
    fail.set()

    def search(vectors: np.ndarray, k: int) -> list[list[int]]:
        if fail.is_set():
            fail.clear()
            raise RuntimeError("the index went away")
        return index.search(vectors, k)[1].tolist()

    batcher = SearchBatcher(search)
    with pytest.raises(RuntimeError, match="went away"):
        batcher.search(queries[:1], 2)
    assert batcher.search(queries[:1], 2) == index.search(queries[:1], 2)[1].tolist()
