"""Index types, their memory cost, the choice among them, and building one shard by shard.

Four types, as FAISS factory strings (N vectors of dimension D, float32):

| type       | factory         | bytes in memory (about)              | search                   |
| ---------- | --------------- | ------------------------------------ | ------------------------ |
| `flat`     | `Flat`          | 4 D N                                | exact                    |
| `hnsw`     | `HNSW{M},Flat`  | (4 D + 8 M + 16) N                   | graph walk, `efSearch`   |
| `ivf_flat` | `IVF{L},Flat`   | (4 D + 16) N + 4 D L                 | `nprobe` of L lists      |
| `ivf_pq`   | `IVF{L},PQ{m}`  | (m + 16) N + 4 D L + 1024 D          | `nprobe`, PQ-compressed  |

Index rows are numbered 0..N-1 in shard order (no id map): ``ids.parquet`` row r is index row r.
For ``cosine`` the vectors are L2-normalised; ``flat`` uses inner products, the others squared L2
on the unit sphere (``cos = 1 - d / 2``), the usual metric for IVF training and HNSW.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semclust.errors import UserError
from semclust.index.exact import similarity_space
from semclust.index.faiss_ops import to_gpus
from semclust.rundir.embeddings import ShardSet, read_checked, sample_rows, sample_size

log = logging.getLogger(__name__)

# Candidate IVF-PQ code sizes (bytes per vector, 8 bits per sub-quantizer), largest first.
_PQ_BYTES = (1024, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
MIN_POINTS_PER_LIST = 39  # FAISS's own floor for k-means training
_ADD_BATCH = 65_536


def auto_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, a power of two, with at least 39 training rows per list."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(target, n // MIN_POINTS_PER_LIST)))


@dataclass(frozen=True)
class IndexSpec:
    """What to build: a type, its parameters, the dimension and the metric."""

    kind: str
    dim: int
    metric: str  # cosine | l2
    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0

    @property
    def factory(self) -> str:
        return {
            "flat": "Flat",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            "ivf_flat": f"IVF{self.nlist},Flat",
            "ivf_pq": f"IVF{self.nlist},PQ{self.pq_m}",
        }[self.kind]

    @property
    def inner_product(self) -> bool:
        """Whether FAISS scores are inner products (else squared L2 distances)."""
        return self.kind == "flat" and self.metric == "cosine"

    def memory_bytes(self, n: int) -> int:
        """Estimated bytes the filled index takes in memory (see the module table)."""
        d = self.dim
        if self.kind == "flat":
            return 4 * d * n
        if self.kind == "hnsw":
            return (4 * d + 8 * self.hnsw_m + 16) * n
        # IVF: codes + 8-byte ids per vector (+ 8 for a direct map when searching by id),
        # the coarse centroids, and for PQ its codebooks (256 centroids per sub-quantizer).
        per_vector = (4 * d if self.kind == "ivf_flat" else self.pq_m) + 16
        extra = 4 * d * self.nlist + (1024 * d if self.kind == "ivf_pq" else 0)
        return per_vector * n + extra

    def to_similarity(self, scores: np.ndarray) -> np.ndarray:
        """FAISS scores float32 (n, k) -> similarities: cosine, or minus squared L2."""
        if self.inner_product:
            return scores.astype(np.float32)
        if self.metric == "cosine":
            return (1.0 - scores / 2.0).astype(np.float32)
        return (-scores).astype(np.float32)

    def new_index(self) -> Any:
        import faiss

        metric = faiss.METRIC_INNER_PRODUCT if self.inner_product else faiss.METRIC_L2
        index = faiss.index_factory(self.dim, self.factory, metric)
        if self.kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = self.ef_construction
        return index

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factory": self.factory}


def depth_name(spec: IndexSpec) -> str | None:
    """The search parameter that trades speed for recall: ``nprobe``, ``ef_search`` or None."""
    if spec.kind.startswith("ivf"):
        return "nprobe"
    return "ef_search" if spec.kind == "hnsw" else None


def depth_steps(spec: IndexSpec) -> list[int]:
    """Search depths tried in order when tuning: nprobe 1, 2, 4, ... up to every list; efSearch
    16, 32, ... 4096."""
    if spec.kind.startswith("ivf"):
        steps = [2**i for i in range(int(math.log2(spec.nlist)) + 1)]
        return steps if steps[-1] == spec.nlist else [*steps, spec.nlist]
    return [2**i for i in range(4, 13)]


def pq_candidates(dim: int) -> list[int]:
    """IVF-PQ bytes per vector possible for ``dim`` (m divides it, 2+ dims per sub-vector)."""
    return [m for m in _PQ_BYTES if 2 * m <= dim and dim % m == 0] or [1]


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_spec(
    n: int,
    dim: int,
    metric: str,
    *,
    kind: str = "auto",
    memory: int | None = None,
    nlist: int | None = None,
    pq_m: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    flat_max_rows: int = 100_000,
    hnsw_max_rows: int = 1_000_000,
    hnsw_max_dim: int = 512,
    gpu: bool = False,
) -> IndexSpec:
    """The index for N vectors of ``dim`` within ``memory`` bytes (None: no limit).

    ``auto`` picks, in order: ``flat`` up to ``flat_max_rows`` (exact, and fast enough there);
    on CPU ``hnsw`` up to ``hnsw_max_rows`` and ``hnsw_max_dim`` (fastest queries at high recall;
    its build cost grows with both); ``ivf_flat``; then ``ivf_pq`` with the most bytes per vector
    that fit. A budget no type fits, or an explicit type over it, raises ``UserError``.
    """
    lists = nlist or auto_nlist(n)
    lists = max(1, min(lists, n))

    def spec(k: str, m: int = 0) -> IndexSpec:
        return IndexSpec(
            k,
            dim,
            metric,
            nlist=lists if k.startswith("ivf") else 0,
            pq_m=m,
            hnsw_m=hnsw_m if k == "hnsw" else 0,
            ef_construction=ef_construction if k == "hnsw" else 0,
        )

    pq_options = [pq_m] if pq_m else pq_candidates(dim)
    if pq_m and dim % pq_m:
        raise UserError(f"index.pq_m={pq_m} must divide the embedding dimension {dim}")
    if kind != "auto":
        if kind == "hnsw" and gpu:
            log.info("HNSW is a CPU index: it is built and searched on CPU")
        chosen = spec(kind, pq_options[0] if kind == "ivf_pq" else 0)
        if kind == "ivf_pq" and memory is not None and not pq_m:
            fitting = [m for m in pq_options if spec(kind, m).memory_bytes(n) <= memory]
            chosen = spec(kind, fitting[0] if fitting else pq_options[-1])
        need = chosen.memory_bytes(n)
        if memory is not None and need > memory:
            raise UserError(
                f"index.type={kind} ({chosen.factory}) needs about {_fmt(need)} for {n} vectors "
                f"of dimension {dim}, over the index memory budget of {_fmt(memory)}; raise "
                "--index-memory or use --index-type auto"
            )
        return chosen
    order: list[IndexSpec] = []
    if n <= flat_max_rows:
        order.append(spec("flat"))
    if not gpu and n <= hnsw_max_rows and dim <= hnsw_max_dim:
        order.append(spec("hnsw"))
    order.append(spec("ivf_flat"))
    order += [spec("ivf_pq", m) for m in pq_options]
    for candidate in order:
        if memory is None or candidate.memory_bytes(n) <= memory:
            return candidate
    smallest = min(order, key=lambda s: s.memory_bytes(n))
    raise UserError(
        f"no index type fits {n} vectors of dimension {dim} in an index memory budget of "
        f"{_fmt(memory or 0)}: the smallest, {smallest.factory}, needs about "
        f"{_fmt(smallest.memory_bytes(n))}; raise --index-memory to at least that"
    )


def train_rows_for(spec: IndexSpec, n: int, points_per_list: int, max_bytes: int) -> int:
    """Training-sample rows: ``points_per_list`` per IVF list (256 per PQ centroid at least)."""
    if spec.kind in ("flat", "hnsw"):
        return 0
    wanted = spec.nlist * points_per_list
    if spec.kind == "ivf_pq":
        wanted = max(wanted, 256 * MIN_POINTS_PER_LIST)
    return min(n, sample_size(wanted, spec.dim, max_bytes))


def build_index(
    spec: IndexSpec,
    shards: ShardSet,
    *,
    train_rows: int,
    seed: int,
    gpus: int = 0,
    on_shard: Callable[[np.ndarray, np.ndarray], None] | None = None,
    on_assign: tuple[int, Callable[[np.ndarray], None]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train ``spec`` on a seeded sample and add every shard in order (rows 0..N-1).

    Runs where it is called (a Ray task on a GPU node, typically). With GPUs, IVF training runs
    its k-means on them (``clustering_index``); adding and the stored index stay on CPU, so the
    result is the same file either way. ``on_shard`` receives each shard's image ids and rows
    (in similarity space) as they are added. ``on_assign=(p, callback)`` (an IVF with no
    transform) adds rows to the lists that one coarse search to depth p found, and gives the
    callback those p nearest lists, int32 (rows, p), in row order: a graph reuses them to search
    the same rows. Returns (CPU index, build statistics).
    """
    import faiss

    index = spec.new_index()
    stats: dict[str, Any] = {"train_rows": 0, "train_seconds": 0.0}
    if not index.is_trained:
        start = time.perf_counter()
        sample = similarity_space(sample_rows(shards, train_rows, seed), spec.metric)
        if len(sample) < spec.nlist:
            raise ValueError(
                f"{spec.factory} needs at least {spec.nlist} training rows, got {len(sample)}"
            )
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        if gpus:
            ivf.clustering_index = to_gpus(faiss.IndexFlatL2(spec.dim), shard=False)
        index.train(sample)
        stats.update(train_rows=len(sample), train_seconds=round(time.perf_counter() - start, 3))
    start = time.perf_counter()
    for uri in shards.uris:
        ids, vectors = read_checked(uri, spec.dim)
        x = similarity_space(vectors, spec.metric)
        if on_shard is not None:
            on_shard(ids, x)
        for s in range(0, len(x), _ADD_BATCH):
            batch = x[s : s + _ADD_BATCH]
            if on_assign is None:
                index.add(batch)
                continue
            depth, callback = on_assign
            _, lists = index.quantizer.search(batch, min(depth, spec.nlist))
            nearest = np.ascontiguousarray(lists[:, 0])
            index.add_core(len(batch), faiss.swig_ptr(batch), None, faiss.swig_ptr(nearest))
            callback(lists.astype(np.int32))
    stats["add_seconds"] = round(time.perf_counter() - start, 3)
    if index.ntotal != shards.total:
        raise RuntimeError(f"the index holds {index.ntotal} vectors, the shards {shards.total}")
    return index, stats
