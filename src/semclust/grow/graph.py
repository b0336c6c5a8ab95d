"""The kNN graph of a grown run: edges of the added rows, and the edges they change.

An added row's k nearest neighbours are searched exactly among every row of the run (old and
added, itself excluded); an old row's list changes only where an added row is nearer than its
k-th neighbour, so each old row's list is merged with its exact top-k among the added rows. For
a graph the graph stage searched exactly, the result is the graph a full run on all the images
would have; for an approximate one, the added edges are exact and the old lists keep their
recall. The work is one pass over the run's shards against the added rows (N x N_added
products), in Ray tasks over groups of shards; old ``knn/`` parts are rewritten where they
change (the merge drops ids a list already holds, so a repeat after a crash changes nothing),
the added shards' parts are written last.

Past ``EXACT_PRODUCTS`` (and for a graph the graph stage did not build exactly) those products
cost more than they are worth, and the pass compares rows only within clusters of the run's
k-means model: an added row meets the rows of its ``probes`` nearest centroids (old rows by
their own cluster), the IVF search with the k-means clusters as lists. ``probes`` is the
smallest power of two for which the clusters of a sample of added rows' exact neighbours are
among their probed ones at ``graph.target_recall``; the recall of the added rows' lists is
then measured on that sample against exact search.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust import storage
from semclust.clustering.knn import GRAPH_SEED
from semclust.index.exact import merge_topk, recall_at_k, similarity_space
from semclust.index.faiss_ops import remote_options
from semclust.rundir.embeddings import ShardSet, read_checked
from semclust.rundir.layout import ASSIGNMENTS, KNN
from semclust.rundir.tables import knn_table, part_uri, read_knn_part

if TYPE_CHECKING:
    from semclust.context import RunContext

log = logging.getLogger(__name__)

_BLOCK_FLOATS = 1 << 25  # a shard's similarities to the added rows, computed 128 MB at a time
EXACT_PRODUCTS = 2e11  # multiply-adds of the exact pass (about 20-40 s on 2 cores) above which
# an approximate graph is grown through the clusters
_RECALL_SAMPLE = 500  # added rows whose exact neighbours choose and check the probes
_MAX_PROBES = 256  # clusters an added row may be compared with
_GROUP_BYTES = 1 << 28  # embeddings of the shards one probe task compares at once


def similarities(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """float32 (len(a), len(b)) similarities of rows already in similarity space: cosine
    (normalised dot products), or minus the squared L2 distance, as the graph stores them."""
    dots = a @ b.T
    if metric == "cosine":
        return dots
    sq_a = np.einsum("ij,ij->i", a, a)[:, None]
    sq_b = np.einsum("ij,ij->i", b, b)[None, :]
    return -(sq_a + sq_b - 2 * dots)


def top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(column int64 (n, k'), similarity float32 (n, k')) of each row's k' = min(k, columns)
    largest entries, best first (ties in column order)."""
    kk = min(k, sims.shape[1])
    if kk == 0:
        return np.zeros((len(sims), 0), np.int64), np.zeros((len(sims), 0), np.float32)
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else None
    cols = part if part is not None else np.tile(np.arange(sims.shape[1]), (len(sims), 1))
    vals = np.take_along_axis(sims, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _padded(ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims) widened to k columns with id -1 and similarity -inf."""
    n, have = ids.shape
    if have == k:
        return ids, sims.astype(np.float32)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_sims = np.full((n, k), -np.inf, dtype=np.float32)
    out_ids[:, :have], out_sims[:, :have] = ids, sims
    return out_ids, out_sims


def merge_lists(
    old_ids: np.ndarray, old_sims: np.ndarray, new_ids: np.ndarray, new_sims: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best of its old list and its candidates, an id counted once (a candidate the
    old list already holds is dropped), best first; a tie keeps the old list's entry first."""
    held = (new_ids[:, :, None] == old_ids[:, None, :]).any(axis=2) | (new_ids < 0)
    new_sims = np.where(held, -np.inf, new_sims).astype(np.float32)
    old_sims = np.where(old_ids < 0, -np.inf, old_sims).astype(np.float32)
    ids, sims = merge_topk([(old_ids, old_sims), (np.where(held, -1, new_ids), new_sims)], k)
    return np.where(np.isfinite(sims), ids, -1), sims


def update_group(
    shard_uris: list[str],
    old: list[bool],
    knn_uris: list[str],
    added_ids: np.ndarray,
    added: np.ndarray,
    k: int,
    metric: str,
    dim: int,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Ray task body over a group of shards: each old shard's ``knn/`` part merged with its rows'
    top-k among the added rows (rewritten when it changes); and the added rows' top-k among the
    group's rows, themselves excluded. Returns (ids int64 (A, k), sims float32 (A, k), old
    rows whose list changed)."""
    import threadpoolctl

    best_ids = np.full((len(added_ids), k), -1, dtype=np.int64)
    best_sims = np.full((len(added_ids), k), -np.inf, dtype=np.float32)
    changed = 0
    with threadpoolctl.threadpool_limits(threads):
        for uri, is_old, knn_uri in zip(shard_uris, old, knn_uris, strict=True):
            ids, vectors = read_checked(uri, dim)
            x = similarity_space(vectors, metric)
            row_ids = np.full((len(ids), k), -1, dtype=np.int64)
            row_sims = np.full((len(ids), k), -np.inf, dtype=np.float32)
            step = max(1, _BLOCK_FLOATS // max(1, len(ids)))
            for s in range(0, len(added_ids), step):
                cols = slice(s, s + step)
                sims = similarities(x, added[cols], metric)
                # A row is never its own neighbour (an added row meets itself in its shard).
                sims[ids[:, None] == added_ids[None, cols]] = -np.inf
                c, v = top_k(sims.T, k)  # the added rows' nearest in this shard
                found = _padded(np.where(np.isfinite(v), ids[c], -1), v, k)
                best_ids[cols], best_sims[cols] = merge_topk(
                    [(best_ids[cols], best_sims[cols]), found], k
                )
                if is_old:
                    c, v = top_k(sims, k)
                    found = _padded(np.where(np.isfinite(v), added_ids[cols][c], -1), v, k)
                    row_ids, row_sims = merge_topk([(row_ids, row_sims), found], k)
            if is_old:
                changed += _merge_into_part(knn_uri, ids, row_ids, row_sims, k)
    return best_ids, best_sims, changed


def _merge_into_part(
    knn_uri: str, ids: np.ndarray, cand_ids: np.ndarray, cand_sims: np.ndarray, k: int
) -> int:
    """Merge candidates into one old ``knn/`` part, rewritten when a list changes; rows changed."""
    part = read_knn_part(knn_uri)
    assert part.similarities is not None
    if not np.array_equal(part.ids, ids):
        raise RuntimeError(f"{knn_uri} does not hold the rows of its embeddings shard")
    merged_ids, merged_sims = merge_lists(part.neighbors, part.similarities, cand_ids, cand_sims, k)
    rows_changed = int((merged_ids != part.neighbors).any(axis=1).sum())
    if rows_changed:
        storage.write_parquet(knn_uri, knn_table(ids, merged_ids, merged_sims))
    return rows_changed


def _cluster_lists(probes: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """The added rows probing each cluster: (added rows int64, starts int64 (clusters + 1,)),
    cluster c's in rows[starts[c]:starts[c + 1]]."""
    flat = probes.ravel()
    rows = np.repeat(np.arange(len(probes)), probes.shape[1])
    keep = flat >= 0
    order = np.argsort(flat[keep], kind="stable")
    by_cluster = flat[keep][order]
    return rows[keep][order], np.searchsorted(by_cluster, np.arange(clusters + 1))


def probe_group(
    shard_uris: list[str],
    old: list[bool],
    knn_uris: list[str],
    assignment_uris: list[str],
    added_ids: np.ndarray,
    added: np.ndarray,
    probes: np.ndarray,
    clusters: int,
    k: int,
    metric: str,
    dim: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Ray task body: ``update_group`` with rows compared within clusters only: a row meets the
    added rows whose ``probes`` (A, P) hold its own cluster. Shards are taken together up to
    ``_GROUP_BYTES`` of embeddings, so that a cluster is one product per batch, not per shard."""
    members, starts = _cluster_lists(probes, clusters)
    best_ids = np.full((len(added_ids), k), -1, dtype=np.int64)
    best_sims = np.full((len(added_ids), k), -np.inf, dtype=np.float32)
    changed = 0
    batch: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal changed
        if not batch:
            return
        ids = np.concatenate([b[1] for b in batch])
        x = np.concatenate([b[2] for b in batch])
        cluster = np.concatenate([b[3] for b in batch])
        row_ids = np.full((len(ids), k), -1, dtype=np.int64)
        row_sims = np.full((len(ids), k), -np.inf, dtype=np.float32)
        order = np.argsort(cluster, kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(cluster[order]) != 0, True])
        for a, b in itertools.pairwise(bounds):
            rows = order[a:b]
            c = int(cluster[rows[0]])
            near = members[starts[c] : starts[c + 1]]
            if not len(near):
                continue
            sims = similarities(x[rows], added[near], metric)
            sims[ids[rows][:, None] == added_ids[near][None, :]] = -np.inf
            col, val = top_k(sims, k)
            row_ids[rows], row_sims[rows] = _padded(
                np.where(np.isfinite(val), added_ids[near][col], -1), val, k
            )
            col, val = top_k(sims.T, k)
            found = _padded(np.where(np.isfinite(val), ids[rows][col], -1), val, k)
            best_ids[near], best_sims[near] = merge_topk(
                [(best_ids[near], best_sims[near]), found], k
            )
        start = 0
        for i, part_ids, _, _ in batch:
            span = slice(start, start + len(part_ids))
            start += len(part_ids)
            if old[i]:
                changed += _merge_into_part(knn_uris[i], part_ids, row_ids[span], row_sims[span], k)
        batch.clear()

    rows_held = 0
    for i, uri in enumerate(shard_uris):
        ids, vectors = read_checked(uri, dim)
        table = storage.read_parquet(assignment_uris[i], ["image_id", "cluster"])
        if not np.array_equal(table.column("image_id").to_numpy(), ids):
            raise RuntimeError(f"{assignment_uris[i]} does not hold the rows of {uri}")
        cluster = table.column("cluster").to_numpy().astype(np.int64)
        batch.append((i, ids, similarity_space(vectors, metric), cluster))
        rows_held += len(ids)
        if rows_held * dim * 4 >= _GROUP_BYTES:
            flush()
            rows_held = 0
    flush()
    return best_ids, best_sims, changed


def read_added(uris: list[str], dim: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Ray task body: (image ids int64 (A,), rows in similarity space float32 (A, D)) of the
    added shards, so that the driver never holds them."""
    parts = [read_checked(u, dim) for u in uris]
    ids = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([similarity_space(p[1], metric) for p in parts])
    return ids, np.ascontiguousarray(rows, dtype=np.float32)


def added_rows(uris: list[str], dim: int, rows: np.ndarray) -> np.ndarray:
    """Ray task body: the embeddings float32 (m, D) of the added rows ``rows`` (sorted)."""
    x = np.concatenate([read_checked(u, dim)[1] for u in uris])
    return x[rows]


def probes_of(run_dir: str, uris: list[str], dim: int, depth: int) -> np.ndarray:
    """Ray task body: each added row's ``depth`` nearest centroids of the run's model, int32."""
    x = np.concatenate([read_checked(u, dim)[1] for u in uris])
    return nearest_centroids(run_dir, x, depth)[1].astype(np.int32)


def nearest_centroids(run_dir: str, x: np.ndarray, depth: int) -> tuple[int, np.ndarray]:
    """(k, the ``depth`` nearest centroids int64 (n, depth) of embeddings ``x``)."""
    from semclust.clustering.kmeans import CentroidAssigner
    from semclust.clustering.model import KMeansModel

    model, _ = KMeansModel.load(run_dir)
    depth = min(depth, model.k)
    assigner = CentroidAssigner(model, gpus=0, nprobe=depth)
    _, found = assigner.index.search(model.transform.apply(x), depth)
    return model.k, found


def merge_and_write(
    run_dir: str,
    added_uris: list[str],
    rows: list[int],
    added_ids: np.ndarray,
    k: int,
    sample: np.ndarray | None,
    *results: tuple[np.ndarray, np.ndarray, int],
) -> tuple[np.ndarray | None, int]:
    """Ray task body: the added rows' lists merged over the tasks' ``results`` and written as
    their ``knn/`` parts (``rows`` per added shard, ``added_ids`` in their order); (the sample
    rows' lists, old rows changed)."""
    best_ids, best_sims = merge_topk([(r[0], r[1]) for r in results], k)
    best_ids = np.where(np.isfinite(best_sims), best_ids, -1)
    start = 0
    for uri, n in zip(added_uris, rows, strict=True):
        span = slice(start, start + n)
        storage.write_parquet(
            part_uri(run_dir, KNN, uri),
            knn_table(added_ids[span], best_ids[span], best_sims[span]),
        )
        start += n
    changed = int(sum(r[2] for r in results))
    return (best_ids[sample] if sample is not None else None), changed


def grow_graph(
    ctx: RunContext,
    shards: ShardSet,
    added_uris: list[str],
    k: int,
    metric: str,
    *,
    exact_graph: bool,
    search: str,
    target_recall: float,
) -> dict[str, Any]:
    """Add the ``added_uris`` shards' rows to the run's kNN graph (see the module); the record.
    ``search`` (``add.graph_search``): exact, clusters, or auto: exact when ``exact_graph`` (the
    graph stage searched exactly) or when it costs under ``EXACT_PRODUCTS``. The added rows and
    their lists stay in Ray's object store and tasks: the driver holds their ids."""
    ray = ctx.start_ray()
    added_set = set(added_uris)
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    added_count = [rows_of[u] for u in added_uris]
    n_added = sum(added_count)
    reader = ctx.remote(read_added, num_returns=2, **remote_options(num_cpus=1))
    ids_ref, added_ref = reader.remote(added_uris, shards.dim, metric)
    products = float(shards.total) * n_added * shards.dim
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, min(len(shards.uris), 4 * cpus))
    size = -(-len(shards.uris) // tasks)
    groups = [shards.uris[s : s + size] for s in range(0, len(shards.uris), size)]
    record: dict[str, Any] = {"rows_added": n_added, "tasks": len(groups)}
    ctx.ensure_held()
    if search == "auto":
        search = "exact" if exact_graph or products <= EXACT_PRODUCTS else "clusters"
    sample = truth = None
    old = [[u not in added_set for u in group] for group in groups]
    knn = [[part_uri(ctx.run_dir, KNN, u) for u in group] for group in groups]
    if search == "exact":
        record["search"] = "exact"
        task = ctx.remote(update_group, **remote_options(num_cpus=1))
        refs = [
            task.remote(g, o, n, ids_ref, added_ref, k, metric, shards.dim)
            for g, o, n in zip(groups, old, knn, strict=True)
        ]
    else:
        depth, clusters, sample, truth, chosen = _choose_probes(
            ctx, shards, added_uris, ray.get(ids_ref), k, metric, target_recall
        )
        record["search"] = f"within clusters: {depth} of {clusters} probed"
        record["probes"] = chosen
        prober = ctx.remote(probes_of, **remote_options(num_cpus=1))
        probes_ref = prober.remote(ctx.run_dir, added_uris, shards.dim, depth)
        task = ctx.remote(probe_group, **remote_options(num_cpus=1))
        common = (ids_ref, added_ref, probes_ref, clusters, k, metric, shards.dim)
        refs = [
            task.remote(g, o, n, [part_uri(ctx.run_dir, ASSIGNMENTS, u) for u in g], *common)
            for g, o, n in zip(groups, old, knn, strict=True)
        ]
    # Every task's lists are merged where they are, in one more task; the driver gets counts.
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    ctx.ensure_held()
    writer = ctx.remote(merge_and_write, **remote_options(num_cpus=1))
    found, changed = ray.get(
        writer.remote(ctx.run_dir, added_uris, added_count, ids_ref, k, sample, *refs)
    )
    if sample is not None:
        record["recall"] = {
            "recall_at_k": round(recall_at_k(found, truth), 5),
            "queries": len(sample),
        }
    record["old_rows_changed"] = changed
    log.info(
        "add: kNN edges of %d added rows (%s); %d old lists changed",
        n_added,
        record["search"],
        changed,
    )
    return record


def _clusters_of(run_dir: str, image_ids: np.ndarray) -> np.ndarray:
    """The cluster of each image id (any shape; -2 for -1 or an id without an assignment), one
    assignments part at a time."""
    out = np.full(image_ids.shape, -2, dtype=np.int64)
    flat, where = image_ids.ravel(), out.ravel()
    order = np.argsort(flat)
    for uri in storage.list_shards(storage.join(run_dir, ASSIGNMENTS)):
        table = storage.read_parquet(uri, ["image_id", "cluster"])
        ids = table.column("image_id").to_numpy()
        pos = np.minimum(np.searchsorted(flat, ids, sorter=order), len(flat) - 1)
        # Each id of the part that is wanted: every place it is wanted.
        for i in np.flatnonzero(flat[order[pos]] == ids):
            lo = np.searchsorted(flat, ids[i], side="left", sorter=order)
            hi = np.searchsorted(flat, ids[i], side="right", sorter=order)
            where[order[lo:hi]] = table.column("cluster")[int(i)].as_py()
    return out


def _choose_probes(
    ctx: RunContext,
    shards: ShardSet,
    added_uris: list[str],
    added_ids: np.ndarray,
    k: int,
    metric: str,
    target_recall: float,
) -> tuple[int, int, np.ndarray, np.ndarray, dict[str, Any]]:
    """(probes P, clusters, sample rows, their exact neighbours, the choice's record): the
    smallest P = 1, 2, 4, ... whose probed clusters hold ``target_recall`` of a sample of added
    rows' exact neighbours (by the neighbours' own clusters)."""
    from semclust.index.exact import drop_self, exact_topk

    rng = np.random.default_rng(GRAPH_SEED)
    sample = np.sort(rng.choice(len(added_ids), min(_RECALL_SAMPLE, len(added_ids)), replace=False))
    fetch = ctx.remote(added_rows, **remote_options(num_cpus=1))
    raw = ctx.start_ray().get(fetch.remote(added_uris, shards.dim, sample))
    clusters, probes = nearest_centroids(ctx.run_dir, raw, _MAX_PROBES)
    found, sims = exact_topk(ctx, shards.uris, raw, k + 1, metric)
    truth = drop_self(added_ids[sample], found, sims, k)[0]
    truth_clusters = _clusters_of(ctx.run_dir, truth)
    deepest = probes.shape[1]
    tried = []
    depth = 1
    while True:
        held = (truth_clusters[:, :, None] == probes[:, None, :depth]).any(axis=2)
        covered = float(held[truth >= 0].mean()) if (truth >= 0).any() else 1.0
        tried.append({"probes": depth, "neighbours_in_probed_clusters": round(covered, 5)})
        if covered >= target_recall or depth >= deepest:
            break
        depth = min(2 * depth, deepest)
    return (
        depth,
        clusters,
        sample,
        truth,
        {
            "chosen": depth,
            "target_recall": target_recall,
            "tried": tried,
        },
    )
