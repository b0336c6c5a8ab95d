"""Concurrent searches answered by one FAISS call.

A flat or IVF search reads the same vectors for one query as for many (it is bound by memory,
not arithmetic), so eight clients searching at once cost about what one does if their queries go
to the index together. A caller that finds a search running queues its queries and waits; when
that search ends, one waiting caller takes every queued query and searches them as one batch.
No caller waits on a timer: alone, a query is searched at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Search = Callable[[np.ndarray, int], list[list[Any]]]


@dataclass
class _Pending:
    vectors: np.ndarray
    k: int
    result: list[list[Any]] | None = None
    error: BaseException | None = None
    done: bool = False


class SearchBatcher:
    """``search(vectors, k)`` (one result list per row), with concurrent calls merged."""

    def __init__(self, search: Search) -> None:
        self._search = search
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False
        self.largest_batch = 0  # queries in the largest merged search so far

    def search(self, vectors: np.ndarray, k: int) -> list[list[Any]]:
        item = _Pending(vectors, k)
        with self._cond:
            self._queue.append(item)
            while not item.done and self._busy:
                self._cond.wait()
            if item.done:
                return self._outcome(item)
            self._busy = True
            batch, self._queue = self._queue, []
        try:
            self._run(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return self._outcome(item)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            k = max(p.k for p in batch)
            results = self._search(np.concatenate([p.vectors for p in batch]), k)
            start = 0
            for p in batch:
                p.result = [hits[: p.k] for hits in results[start : start + len(p.vectors)]]
                start += len(p.vectors)
        except BaseException as exc:  # every caller of the batch gets the error
            for p in batch:
                p.error = exc
        self.largest_batch = max(self.largest_batch, sum(len(p.vectors) for p in batch))
        for p in batch:
            p.done = True

    @staticmethod
    def _outcome(item: _Pending) -> list[list[Any]]:
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result
