"""Seeded, order-independent selection of rows, shard by shard.

The report never gathers every row on the driver. Each shard keeps only its best candidates
(the ``n`` smallest of some key per cluster) and the driver keeps the best of those: the result
is the same as a global selection, whatever the number or order of the shards. A random sample
is the same trick with a hash of the image id as the key ("bottom-k" sampling), so it is seeded,
uniform and reproducible.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def hash_key(image_ids: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random uint64 (n,) per int64 image id (splitmix64 of id + salt).

    Equal ids give equal keys in every process, so shards can be sampled independently.
    """
    offset = np.uint64((_GOLDEN * (salt + 1)) & _MASK64)
    with np.errstate(over="ignore"):
        z = np.asarray(image_ids).astype(np.uint64) + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_threshold(fraction: float) -> np.uint64:
    """The uint64 key below which a ``fraction`` of uniformly hashed keys fall."""
    if fraction >= 1.0:
        return np.uint64(_MASK64)
    return np.uint64(int(max(fraction, 0.0) * float(1 << 64)))


def smallest_per_group(
    groups: np.ndarray, values: np.ndarray, n: int, tiebreak: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the ``n`` smallest ``values`` within each group, ordered by group then value.

    ``groups`` and ``values`` are (m,) arrays; ties are broken by ``tiebreak`` (e.g. image ids)
    so that the choice does not depend on the order the rows arrived in.
    """
    if len(groups) == 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    keys = (values, groups) if tiebreak is None else (tiebreak, values, groups)
    order = np.lexsort(keys)
    g = np.asarray(groups)[order]
    starts = np.concatenate(([0], np.flatnonzero(g[1:] != g[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [len(g)])))
    rank = np.arange(len(g)) - np.repeat(starts, lengths)
    return order[rank < n]
