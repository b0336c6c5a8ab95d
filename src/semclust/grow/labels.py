"""Labels of images added to a labelled run, by the rules the label stage used; the labels of
the images already there are kept as they are.

- ``refs``: each added image's nearest reference prototype, ``unknown`` under the class
  threshold the label stage recorded, then the same vote over the image and its ``vote_k``
  nearest neighbours (their own candidates, weighted by similarity).
- ``seed_labels``: the classifier head refitted on the same seed images (the seeds already in
  the run, with the label stage's seed: the head it used); an added image named in the seed file
  takes its seed label. Where the label stage chose propagation (or a blend), the added image's
  label distribution is one propagation step from its labelled neighbours (their labels,
  weighted by similarity), the head's where none is labelled, blended as the stage did.
- ``names``: an added image in a named cluster takes the cluster's name.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from semclust import storage
from semclust.config import LabelConfig
from semclust.label.common import UNKNOWN, LabelWriter, read_uri_labels, uri_key
from semclust.rundir.embeddings import RunRows, normalize_rows, read_checked
from semclust.rundir.layout import ASSIGNMENTS, KNN, LABELS
from semclust.rundir.tables import part_uri, read_knn_part

log = logging.getLogger(__name__)


def _old_labels(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(image ids int64 sorted, their labels object) of every labelled image."""
    ids, labels = [], []
    for uri in storage.list_shards(storage.join(run_dir, LABELS)):
        table = storage.read_parquet(uri, ["image_id", "label"])
        ids.append(table.column("image_id").to_numpy())
        labels.append(np.asarray(table.column("label").to_pylist(), dtype=object))
    if not ids:
        return np.empty(0, np.int64), np.empty(0, object)
    all_ids, all_labels = np.concatenate(ids), np.concatenate(labels)
    order = np.argsort(all_ids)
    return all_ids[order], all_labels[order]


def _lookup(sorted_ids: np.ndarray, values: np.ndarray, wanted: np.ndarray, missing: Any) -> Any:
    """values of ``wanted`` ids (any shape) in ``sorted_ids``; ``missing`` where absent."""
    if not len(sorted_ids):
        return np.full(wanted.shape, missing, dtype=values.dtype)
    pos = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == wanted, values[pos], missing)


def _vote(
    own: np.ndarray, neighbor_class: np.ndarray, weights: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(winner, share) of a vote: each row's own class ``own`` (n,) with weight 1, and its
    neighbours' classes (n, m) (-1: no vote) with ``weights`` (n, m); classes 0..classes."""
    votes = np.zeros((len(own), classes + 1), dtype=np.float64)
    votes[np.arange(len(own)), own] += 1.0
    ok = neighbor_class >= 0
    rows = np.broadcast_to(np.arange(len(own))[:, None], neighbor_class.shape)
    np.add.at(votes, (rows[ok], neighbor_class[ok]), weights[ok])
    votes /= votes.sum(axis=1, keepdims=True)
    winner = votes.argmax(axis=1)
    return winner, votes[np.arange(len(own)), winner].astype(np.float32)


def _edge_weights(sims: np.ndarray, metric: str) -> np.ndarray:
    return np.maximum(sims, 0.0) if metric == "cosine" else np.ones_like(sims)


class _Added:
    """The added rows: ids, normalised embeddings, their kNN lists and k-means clusters."""

    def __init__(self, run_dir: str, shard_uris: list[str], dim: int) -> None:
        self.shards: list[tuple[str, slice]] = []
        ids, vectors, neighbors, sims, clusters = [], [], [], [], []
        start = 0
        for uri in shard_uris:
            i, v = read_checked(uri, dim)
            self.shards.append((uri, slice(start, start + len(i))))
            start += len(i)
            ids.append(i)
            vectors.append(normalize_rows(v))
            knn_uri = part_uri(run_dir, KNN, uri)
            if storage.exists(knn_uri):
                part = read_knn_part(knn_uri)
                neighbors.append(part.neighbors)
                sims.append(part.similarities)
            table = storage.read_parquet(part_uri(run_dir, ASSIGNMENTS, uri), ["cluster"])
            clusters.append(table.column("cluster").to_numpy())
        self.ids = np.concatenate(ids)
        self.vectors = np.concatenate(vectors)
        self.clusters = np.concatenate(clusters)
        self.neighbors = np.concatenate(neighbors) if len(neighbors) == len(ids) else None
        self.sims = np.concatenate(sims) if self.neighbors is not None else None


def carry_labels(
    run_dir: str, lc: LabelConfig, record: dict[str, Any], added_uris: list[str], metric: str
) -> dict[str, Any]:
    """Ray task body: write ``labels/`` parts of the ``added_uris`` shards (see the module);
    the summary for run.json."""
    rows = RunRows.load(run_dir)
    added = _Added(run_dir, added_uris, rows.dim)
    n = len(added.ids)
    labels = np.full(n, UNKNOWN, dtype=object)
    confidence = np.zeros(n, dtype=np.float32)
    source = np.full(n, "", dtype=object)
    write = np.zeros(n, dtype=bool)
    mode = str(record.get("mode", ""))
    rule = []
    if lc.refs is not None and mode.startswith("refs"):
        labels, confidence = _by_references(run_dir, lc, record, rows, added, metric)
        source[:], write[:] = "refs", True
        rule.append("refs")
    elif lc.seed_labels is not None and mode.startswith("seed_labels"):
        labels, confidence, source = _by_seeds(run_dir, lc, record, rows, added, metric)
        write[:] = True
        rule.append(f"seed_labels ({record.get('method')})")
    if lc.names is not None and "names" in mode:
        from semclust.label.names import name_clusters, read_names

        k = int(max(added.clusters.max(), 0)) + 1
        named_map = read_names(lc.names, max(k, _model_k(run_dir)))
        is_named, names = name_clusters(added.clusters, named_map)
        labels = np.where(is_named, names, labels)
        confidence = np.where(is_named, 1.0, confidence).astype(np.float32)
        source = np.where(is_named, "names", source)
        write |= is_named
        rule.append("names")
    writer = LabelWriter(run_dir, fresh=False)
    for uri, span in added.shards:
        keep = write[span]
        if keep.any():
            writer.write(
                uri,
                added.ids[span][keep],
                labels[span][keep],
                confidence[span][keep],
                source[span][keep],
            )
    return {"rule": " + ".join(rule), "labels_written": writer.written, "classes": writer.summary()}


def _model_k(run_dir: str) -> int:
    from semclust.clustering import model as model_files

    return int(model_files.read_summary(run_dir)["k"])


def _by_references(
    run_dir: str,
    lc: LabelConfig,
    record: dict[str, Any],
    rows: RunRows,
    added: _Added,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    from semclust.label.refs import embed_references, list_references, prototypes

    assert lc.refs is not None
    names, ref_emb, ref_index = embed_references(run_dir, list_references(lc.refs))
    protos = prototypes(ref_emb, ref_index, len(names))
    recorded = record.get("thresholds") or {}
    if set(recorded) != set(names):
        raise RuntimeError(
            f"the reference classes changed since the label stage ({sorted(recorded)} -> "
            f"{sorted(names)}): run `semclust label` again"
        )
    thresholds = np.array([recorded[name] for name in names], dtype=np.float64)
    classes = len(names)

    def vote_class(vectors: np.ndarray) -> np.ndarray:
        sims = vectors @ protos.T
        candidate = np.argmax(sims, axis=1)
        return np.where(sims.max(axis=1) >= thresholds[candidate], candidate, classes)

    own = vote_class(added.vectors)
    if added.neighbors is None:
        winner, share = own, np.ones(len(own), dtype=np.float32)
    else:
        neighbors = added.neighbors[:, : lc.vote_k]
        sims = added.sims[:, : lc.vote_k]
        where = rows.rows_of(neighbors)
        cls = np.full(neighbors.shape, -1, dtype=np.int64)
        found = where >= 0
        needed, inverse = np.unique(where[found], return_inverse=True)
        cls[found] = _map_rows(rows, needed, vote_class)[inverse]
        winner, share = _vote(own, cls, _edge_weights(sims, metric), classes)
    labels = np.asarray([*names, UNKNOWN], dtype=object)[winner]
    labels[share < lc.min_confidence] = UNKNOWN
    return labels, share


def _map_rows(rows: RunRows, needed: np.ndarray, fn: Any) -> np.ndarray:
    """``fn`` (normalised embeddings (m, D) -> (m,)) of the sorted rows ``needed``, reading
    only the shards that hold one, one at a time."""
    out = np.empty(len(needed), dtype=np.int64)
    for uri, span in rows.shards():
        a, b = np.searchsorted(needed, [span.start, span.stop])
        if b > a:
            _, vectors = read_checked(uri, rows.dim)
            out[a:b] = fn(normalize_rows(vectors[needed[a:b] - span.start]))
    return out


def _by_seeds(
    run_dir: str, lc: LabelConfig, record: dict[str, Any], rows: RunRows, added: _Added, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from semclust.label.seeds import PREDICT_ROWS, HeadTrainer

    assert lc.seed_labels is not None
    uris, seed_labels = read_uri_labels(lc.seed_labels)
    keys = np.array([uri_key(u) for u in uris], dtype=np.int64)
    found = rows.rows_of(keys)
    added_rows = set(rows.rows_of(added.ids).tolist())
    is_old = np.array([r >= 0 and int(r) not in added_rows for r in found], dtype=bool)
    # The seeds the label stage saw: those in the run before the images were added.
    seed_rows, first = np.unique(found[is_old], return_index=True)
    seed_names = np.asarray(seed_labels, dtype=object)[is_old][first].astype(str)
    names, y = np.unique(seed_names, return_inverse=True)
    label_names = np.asarray([*names.tolist(), UNKNOWN], dtype=object)
    head = HeadTrainer(rows.dim, len(names), lc).fit(rows.gather(seed_rows), y)
    method = str(record.get("method", "head"))
    probs = np.concatenate(
        [head(added.vectors[s : s + PREDICT_ROWS]) for s in range(0, len(added.ids), PREDICT_ROWS)]
    )
    if method != "head" and added.neighbors is not None:
        old_ids, old_labels = _old_labels(run_dir)
        neighbor_labels = _lookup(old_ids, old_labels, added.neighbors, None)
        class_of = {name: i for i, name in enumerate(names.tolist())}
        cls = np.vectorize(lambda v: class_of.get(v, -1), otypes=[np.int64])(neighbor_labels)
        weights = _edge_weights(added.sims, metric)
        prop = np.zeros_like(probs)
        ok = cls >= 0
        r = np.broadcast_to(np.arange(len(cls))[:, None], cls.shape)
        np.add.at(prop, (r[ok], cls[ok]), weights[ok])
        total = prop.sum(axis=1, keepdims=True)
        reached = total[:, 0] > 0
        prop = np.where(reached[:, None], prop / np.maximum(total, 1e-12), probs)
        probs = prop if method == "propagation" else (probs + prop) / 2
    winner = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), winner].astype(np.float32)
    labels = label_names[winner]
    labels[confidence < lc.min_confidence] = UNKNOWN
    source = np.full(len(winner), method, dtype=object)
    # An added image the seed file names is a seed: its own label, as in a full run.
    seed_of = dict(zip(keys.tolist(), seed_labels, strict=True))
    for i, image_id in enumerate(added.ids.tolist()):
        if image_id in seed_of:
            labels[i], confidence[i], source[i] = seed_of[image_id], 1.0, "seed"
    return labels, confidence, source
