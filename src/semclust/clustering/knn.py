"""The kNN graph's pieces: the method by N, the index a graph searches, and the actor that
answers a shard's queries (the graph stage, ``graph_stage``, runs them).

Methods (``graph.method``):

- ``exact``: each actor builds a flat index from the embeddings shards (on its GPUs when there are
  any, float16 storage with ``graph.fp16``) and answers exactly;
- ``ivf`` / ``hnsw``: one Ray task trains an IVF-Flat (or builds an HNSW, CPU only) on a sample,
  adds the shards one by one and stores the index and its rows' image ids under
  ``knn/.graph-index/``; each actor loads those files (never an object pickled from the driver),
  IVF onto its GPUs when present;
- ``auto``: exact up to ``exact_max_rows`` rows, IVF above.

An approximate graph's search depth (``nprobe`` / ``efSearch``) is tuned: the smallest of
1, 2, 4, ... that reaches ``graph.target_recall`` on seeded queries against exact search
(``tune_depth``). On CPU an IVF graph answers a batch of queries bucketed by list
(``faiss.contrib.big_batch_search``): each list is scanned once per batch as a matrix product
instead of once per query that probes it, the same results as ``index.search`` at the same nprobe.

Each query shard becomes ``knn/part-NNNNN.parquet`` (``rundir.tables.knn_table``): ``image_id``,
``neighbors`` list<int64>[k] and ``similarities`` list<float32>[k], nearest first, the row itself
excluded. Similarity is the cosine for ``metric=cosine`` and minus the squared L2 distance for
``metric=l2``.
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust import storage
from semclust.config import GraphConfig, parse_bytes
from semclust.index.exact import drop_self, exact_topk, recall_at_k, similarity_space
from semclust.index.factory import (
    MIN_POINTS_PER_LIST,
    IndexSpec,
    build_index,
    depth_name,
    depth_steps,
    train_rows_for,
)
from semclust.index.faiss_ops import (
    bucketed_search,
    claimed_cpus,
    load_index,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    to_gpus,
)
from semclust.rundir.embeddings import ShardSet, read_checked, sample_rows
from semclust.rundir.tables import knn_table

if TYPE_CHECKING:
    from semclust.context import RunContext

log = logging.getLogger(__name__)

GRAPH_INDEX = ".graph-index/index.faiss"  # hidden: shard listings skip it; removed when done
GRAPH_IDS = ".graph-index/ids.npy"  # image id of each index row
GRAPH_ASSIGN = ".graph-index/lists.npy"  # each row's nearest IVF lists, int32 (N, ASSIGN_DEPTH)
# Lists kept per row from the build's coarse search: a graph tuned to nprobe <= this searches
# its rows with no coarse search of its own.
ASSIGN_DEPTH = 16
_EXACT_MAX_ROWS_GPU = 4_000_000
# On CPU, IVF (nprobe 16) overtook exact search near 30,000 rows at 256-d (benchmarks/faiss_scale).
_EXACT_MAX_ROWS_CPU = 50_000
GRAPH_SEED = 1234  # IVF training sample and recall queries


def choose_method(gc: GraphConfig, n: int, gpu: bool) -> str:
    """``exact``, ``ivf`` or ``hnsw`` for N rows (``auto``: exact up to exact_max_rows)."""
    if gc.method != "auto":
        return gc.method
    limit = gc.exact_max_rows or (_EXACT_MAX_ROWS_GPU if gpu else _EXACT_MAX_ROWS_CPU)
    return "exact" if n <= limit else "ivf"


def graph_nlist(n: int) -> int:
    """IVF lists for a graph over N rows: a power of two near sqrt(N).

    A graph queries every row, so its cost is N x (the lists' centroids, searched once when each
    row is added) + N x (the rows of the nprobe lists it scans): with the scans bucketed into
    matrix products (``GraphSearcher``) the two are alike per row, and sqrt(N) lists balance them.
    N / 1024 lists (the rule before) made the coarse step grow as N^2: at 10^7 rows 8,192 lists
    spent 457 s adding against 795 s searching, a slope of 1.41 from 10^6 (benchmarks/RESULTS.md).
    """
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(target, n // MIN_POINTS_PER_LIST)))


def graph_spec(gc: GraphConfig, method: str, n: int, dim: int) -> IndexSpec:
    if method == "exact":
        return IndexSpec("flat", dim, gc.metric)
    if method == "hnsw":
        return IndexSpec(
            "hnsw", dim, gc.metric, hnsw_m=gc.hnsw_m, ef_construction=gc.ef_construction
        )
    return IndexSpec("ivf_flat", dim, gc.metric, nlist=min(gc.nlist or graph_nlist(n), n))


def batch_groups(uris: list[str], rows: list[int], max_rows: int, groups: int) -> list[list[str]]:
    """Consecutive shards in batches of at most ``max_rows`` rows (a shard larger than that is a
    batch alone), and into at least ``groups`` batches where there are that many shards."""
    total = sum(rows)
    limit = max(1, min(max_rows, math.ceil(total / max(1, groups))))
    out: list[list[str]] = []
    size = 0
    for uri, n in zip(uris, rows, strict=True):
        if out and size + n <= limit:
            out[-1].append(uri)
            size += n
        else:
            out.append([uri])
            size = n
    return out


class GraphSearcher:
    """One actor's index over every embedding of the run; rows map to image ids."""

    def __init__(
        self,
        shards: ShardSet,
        spec: IndexSpec,
        index_uri: str | None,
        gc: GraphConfig,
        threads: float | None,
    ) -> None:
        import faiss

        set_threads(threads)
        self.spec = spec
        self.gc = gc
        gpus = resolve_gpus(gc.device, "graph search")
        self.lists: np.ndarray | None = None  # the build's nearest lists of each row (IVF, CPU)
        self.first_row: dict[str, int] = {}
        if index_uri is None:
            flat = faiss.IndexFlatIP if spec.inner_product else faiss.IndexFlatL2
            index: Any = flat(spec.dim)
            # One GPU: add straight into GPU memory. Several: FAISS's sharded index takes one
            # add() only, so the rows are gathered on the host first and then split over the GPUs.
            if gpus == 1:
                index = to_gpus(index, fp16=gc.fp16)
            id_parts = []
            for uri in shards.uris:
                ids, vectors = read_checked(uri, spec.dim)
                index.add(similarity_space(vectors, spec.metric))
                id_parts.append(ids)
            if gpus > 1:
                index = to_gpus(index, fp16=gc.fp16, shard=True)
            self.ids = np.concatenate(id_parts)
        else:
            # Local: actors on a node share its pages. On object storage it is read whole: a
            # graph's index lives as long as the stage, not worth a copy in the local cache.
            index = load_index(index_uri, mmap=not storage.is_remote(index_uri))
            if gpus and spec.kind != "hnsw":
                index = to_gpus(index)
            self.ids = np.asarray(load_array(beside(index_uri, GRAPH_IDS)))
            if spec.kind == "ivf_flat" and not gpus:
                self.lists = load_array(beside(index_uri, GRAPH_ASSIGN))
                starts = np.cumsum([0, *shards.rows[:-1]])
                self.first_row = dict(zip(shards.uris, starts.tolist(), strict=True))
        if gc.fp16 and not gpus:
            log.warning("graph.fp16 applies to GPU indexes only; this actor searches in float32")
        self.index = index
        self.gpus = gpus
        self.depth: int | None = None
        if index.ntotal != len(self.ids) or index.ntotal != shards.total:
            raise RuntimeError(
                f"the graph index holds {index.ntotal} rows and {len(self.ids)} ids, the shards "
                f"{shards.total}"
            )

    @property
    def bucketed(self) -> bool:
        """Whether batches are searched list by list (IVF on CPU with ``graph.bucketed``)."""
        return self.gc.bucketed and self.spec.kind == "ivf_flat" and not self.gpus

    def set_depth(self, depth: int) -> None:
        """Search ``depth`` IVF lists (nprobe) or HNSW candidates (efSearch) from now on."""
        name = depth_name(self.spec)
        if name is None:
            return
        self.depth = int(depth)
        set_search_params(self.index, on_gpu=self.gpus > 0, **{name: self.depth})

    def search(
        self, queries: np.ndarray, k: int, lists: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 (n, k), similarities float32 (n, k)) of float32 (n, D) queries;
        ``lists``: their nearest IVF lists int32 (n, >= depth) when known (rows of the run)."""
        x = similarity_space(queries, self.spec.metric)
        # Bucketing pays off once the lists get several queries each (and FAISS's bucket sort
        # needs more (query, list) pairs than lists): a tuning sample is searched plainly.
        if self.bucketed and len(x) * (self.depth or 1) > 4 * self.spec.nlist:
            scores, rows = self._bucketed_search(x, k, lists)
        else:
            scores = np.empty((len(x), k), dtype=np.float32)
            rows = np.empty((len(x), k), dtype=np.int64)
            step = self.gc.query_batch_size
            for s in range(0, len(x), step):
                scores[s : s + step], rows[s : s + step] = self.index.search(x[s : s + step], k)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        sims = np.where(rows >= 0, self.spec.to_similarity(scores), -np.inf).astype(np.float32)
        return ids, sims

    def _bucketed_search(
        self, x: np.ndarray, k: int, lists: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
        depth = ivf.nprobe
        # A copy: the search sorts its assignment in place.
        assign = None if lists is None or lists.shape[1] < depth else np.array(lists[:, :depth])
        return bucketed_search(ivf, x, k, assign)

    def tune(
        self, query_ids: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, target: float
    ) -> dict[str, Any]:
        """Set the smallest depth of ``depth_steps`` whose recall@k on ``queries`` (against
        ``truth``, their exact (q, k) neighbours, self excluded) reaches ``target``; the deepest
        when none does. Returns {"value", "recall", "tried": [[depth, recall], ...]}."""
        tried: list[list[float]] = []
        for depth in depth_steps(self.spec):
            if self.spec.kind == "hnsw" and depth < k + 1:
                continue
            self.set_depth(depth)
            found, sims = self.search(queries, k + 1)
            recall = recall_at_k(drop_self(query_ids, found, sims, k)[0], truth)
            tried.append([depth, round(recall, 5)])
            if recall >= target:
                break
        return {"value": self.depth, "recall": tried[-1][1], "tried": tried}

    def graph_batch(self, shard_uris: list[str], out_uris: list[str], k: int) -> int:
        """Search every row of a batch of shards together (k+1, self removed) and write one knn
        part per shard; the rows written."""
        parts = [read_checked(u, self.spec.dim) for u in shard_uris]
        part_ids = [p[0] for p in parts]
        ids = np.concatenate(part_ids)
        vectors = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        del parts  # a batch is up to graph.batch_memory: one copy of it at a time
        lists = None
        if self.lists is not None:  # the build's coarse search of these rows
            lists = np.concatenate(
                [
                    self.lists[self.first_row[u] : self.first_row[u] + len(p)]
                    for u, p in zip(shard_uris, part_ids, strict=True)
                ]
            )
        labels, scores = self.search(vectors, k + 1, lists)
        del vectors
        neighbors, sims = drop_self(ids, labels, scores, k)
        start = 0
        for shard_ids, out_uri in zip(part_ids, out_uris, strict=True):
            end = start + len(shard_ids)
            storage.write_parquet(
                out_uri, knn_table(shard_ids, neighbors[start:end], sims[start:end])
            )
            start = end
        return len(ids)


def beside(index_uri: str, name: str) -> str:
    """The URI of ``name`` (GRAPH_IDS, GRAPH_ASSIGN) in a graph index's folder."""
    return index_uri.rsplit("/", 1)[0] + "/" + name.rsplit("/", 1)[1]


def load_array(uri: str) -> np.ndarray:
    """A stored .npy array; a local one memory-mapped (a 10M-row one is not read whole)."""
    if not storage.is_remote(uri):
        _, path = storage.resolve(uri)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def build_graph_index(
    shards: ShardSet, spec: IndexSpec, gc: GraphConfig, out_uri: str, seed: int
) -> dict[str, Any]:
    """Ray task body: train and fill the approximate index, store it at ``out_uri`` and its rows'
    image ids beside it (written first: the index file is the build's commit)."""
    set_threads(claimed_cpus())
    gpus = resolve_gpus(gc.device, "graph index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(spec, shards.total, 64, parse_bytes(gc.max_train_memory))
    id_parts: list[np.ndarray] = []
    list_parts: list[np.ndarray] = []
    ivf = spec.kind == "ivf_flat"
    index, stats = build_index(
        spec,
        shards,
        train_rows=rows,
        seed=seed,
        gpus=gpus,
        on_shard=lambda ids, _rows: id_parts.append(ids),
        on_assign=(ASSIGN_DEPTH, list_parts.append) if ivf else None,
    )
    _save_array(beside(out_uri, GRAPH_IDS), np.concatenate(id_parts).astype(np.int64))
    if ivf:
        _save_array(beside(out_uri, GRAPH_ASSIGN), np.concatenate(list_parts))
    stats["file_bytes"] = store_index(index, out_uri)
    return stats


def _save_array(uri: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    storage.write_bytes(uri, buffer.getvalue())


def actor_plan(gc: GraphConfig, gpu: bool, jobs: int) -> tuple[int, float]:
    """(actors, CPUs per actor): one per GPU; on CPU one per node holding CPUs, each claiming the
    smallest such node's CPUs (so one fits on every node), or ``gc.num_actors`` sharing them."""
    import ray

    res = ray.cluster_resources()
    node_cpus = [
        float(n["Resources"].get("CPU", 0))
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1
    ] or [1.0]
    if gc.num_actors:
        wanted = gc.num_actors
        cpus = gc.actor_num_cpus or max(1.0, float(int(res.get("CPU", 1) // wanted)))
    elif gpu:
        wanted = int(res.get("GPU", 1))
        cpus = gc.actor_num_cpus or max(1.0, float(int(res.get("CPU", 1) // wanted)))
    else:
        wanted = len(node_cpus)
        cpus = gc.actor_num_cpus or float(int(min(node_cpus)))
    return max(1, min(wanted, jobs)), cpus


def recall_queries(shards: ShardSet, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded query rows: (image ids int64 (q,), float32 (q, D)). The graph draws two such
    samples, one to tune its search depth on and one, held out, to report recall on."""
    return sample_rows(shards, sample, seed + 1, with_ids=True)


def exact_neighbors(
    ctx: RunContext,
    shards: ShardSet,
    query_ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> np.ndarray:
    """Exact (q, k) neighbour ids of rows of the run (self excluded), over every shard.

    Runs Ray tasks (1 CPU each): call it while no searching actor holds the CPUs, or on a small
    node the tasks would never start.
    """
    truth, truth_sims = exact_topk(ctx, shards.uris, queries, k + 1, metric)
    return drop_self(query_ids, truth, truth_sims, k)[0]
