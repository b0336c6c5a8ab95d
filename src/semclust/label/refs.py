"""Labelling from reference images: a folder with one sub-folder of a few example images per class.

1. The references are embedded with the run's own embedder (backbone, weights, size and resize
   as recorded in run.json), and each class gets a prototype: the normalised mean of its
   references' embeddings.
2. Each image's nearest prototype (cosine) is its *candidate*. It is ``unknown`` when that
   similarity is under the class's threshold, set halfway (``unknown_position``) between how
   close the class's references are to their own prototype (leave-one-out) and how close an
   ordinary image of the run is to it (the median over a sample of rows): an image unlike every
   reference is not forced into a class. ``unknown_threshold`` sets one cosine for all instead.
3. Each image's label is then a vote over itself and its kNN-graph neighbours (weighted by edge
   similarity, the image itself by 1) among their candidates, ``unknown`` included; its
   confidence is the winning share. Below ``min_confidence`` the label is ``unknown``.
4. Each cluster is labelled by its centroid's nearest prototype (``unknown`` under the
   threshold), with the share of its images whose label agrees, for run.json.
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust import runinfo, storage
from semclust.errors import UserError
from semclust.label.common import UNKNOWN, LabelWriter, read_graph
from semclust.rundir.embeddings import RunRows

if TYPE_CHECKING:
    from semclust.config import LabelConfig

log = logging.getLogger(__name__)

_BACKGROUND_SAMPLE = 5000  # rows whose similarity to each prototype sets the background level
_EMBED_CHUNK = 64


def list_references(refs: str) -> dict[str, list[str]]:
    """Class name -> image URIs, from a folder/prefix whose sub-folders are the classes.

    Images directly under ``refs`` (in no sub-folder) are refused: their class is unknown.
    """
    from semclust.embed.sources import list_images

    if not storage.exists(refs):
        raise UserError(f"reference folder {refs!r} does not exist")
    root = refs if storage.is_remote(refs) else storage.canonical_uri(refs)
    root = root.rstrip("/") + "/"
    classes: dict[str, list[str]] = {}
    loose = []
    for uri in list_images(refs).uris:
        rel = uri[len(root) :] if uri.startswith(root) else posixpath.basename(uri)
        if "/" not in rel:
            loose.append(uri)
            continue
        classes.setdefault(rel.split("/", 1)[0], []).append(uri)
    if loose:
        raise UserError(
            f"{len(loose)} reference image(s) directly in {refs!r} (e.g. {loose[0]}); put each "
            "class's images in a sub-folder named after the class"
        )
    if len(classes) < 1:
        raise UserError(f"no reference images under {refs!r}: one sub-folder per class expected")
    if UNKNOWN in classes:
        raise UserError(f"a reference class may not be named {UNKNOWN!r}")
    return dict(sorted(classes.items()))


def embed_references(
    run_dir: str, refs: dict[str, list[str]]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, embeddings float32 (m, D) L2-normalised, class index int64 (m,)).

    Embedded like the run's images: its recorded embedder settings and decoding.
    """
    from semclust.embed.actors import EmbedderSpec
    from semclust.embed.decode import ImageDecodeError, decode_image

    record = runinfo.load(run_dir).get("stages", {}).get("embed", {}).get("embedder")
    if not record:
        raise UserError(f"{run_dir!r} has no embedder record in run.json: run `semclust embed`")
    spec = EmbedderSpec(**record)
    embedder = spec.build()
    names = list(refs)
    uris = [u for name in names for u in refs[name]]
    index = np.array([i for i, name in enumerate(names) for _ in refs[name]], dtype=np.int64)
    out = []
    for s in range(0, len(uris), _EMBED_CHUNK):
        pixels = []
        for uri in uris[s : s + _EMBED_CHUNK]:
            try:
                pixels.append(
                    decode_image(storage.read_bytes(uri), spec.input_size, spec.resize).pixels
                )
            except (ImageDecodeError, OSError) as exc:
                raise UserError(f"reference image {uri!r} cannot be used: {exc}") from exc
        out.append(embedder.embed(np.stack(pixels)))
    emb = np.concatenate(out).astype(np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return names, emb, index


def prototypes(emb: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """Normalised class means float32 (C, D) of normalised embeddings (m, D) by class (m,)."""
    protos = np.zeros((classes, emb.shape[1]), dtype=np.float64)
    np.add.at(protos, index, emb)
    protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return protos.astype(np.float32)


def reference_similarity(emb: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """Mean leave-one-out cosine of each class's references to their own prototype, (C,).

    NaN for a class with a single reference (there is nothing to leave one out from).
    """
    out = np.full(classes, np.nan)
    for c in range(classes):
        members = emb[index == c].astype(np.float64)
        if len(members) < 2:
            continue
        total = members.sum(axis=0)
        sims = []
        for m in members:
            rest = total - m
            sims.append(float(m @ rest / max(np.linalg.norm(rest), 1e-12)))
        out[c] = float(np.mean(sims))
    return out


def class_thresholds(
    ref_sim: np.ndarray, background: np.ndarray, position: float, fixed: float | None
) -> np.ndarray:
    """Per-class cosine under which a candidate is ``unknown``, (C,).

    ``background + position x (ref_sim - background)``; a class with one reference takes the mean
    ref_sim of the others. ``fixed`` overrides everything with one value.
    """
    if fixed is not None:
        return np.full(len(ref_sim), fixed, dtype=np.float64)
    if np.isnan(ref_sim).all():
        raise UserError(
            "every reference class has a single image, so no similarity threshold can be "
            "derived: add a second image to some class or set label.unknown_threshold"
        )
    filled = np.where(np.isnan(ref_sim), np.nanmean(ref_sim), ref_sim)
    return background + position * (filled - background)


def label_with_references(
    run_dir: str, lc: LabelConfig, clusters: np.ndarray | None, rows: RunRows
) -> dict[str, Any]:
    """Write labels/ from reference images; returns the run.json record (classes, clusters)."""
    assert lc.refs is not None
    refs = list_references(lc.refs)
    names, ref_emb, ref_index = embed_references(run_dir, refs)
    if ref_emb.shape[1] != rows.dim:
        raise UserError(
            f"reference embeddings are {ref_emb.shape[1]}-d but the run's are {rows.dim}-d"
        )
    C = len(names)
    protos = prototypes(ref_emb, ref_index, C)
    ref_sim = reference_similarity(ref_emb, ref_index, C)
    candidate, best_sim, background, centroid_sums = _candidates(rows, protos, clusters, lc.seed)
    thresholds = class_thresholds(ref_sim, background, lc.unknown_position, lc.unknown_threshold)
    known = best_sim >= thresholds[candidate]
    vote_class = np.where(known, candidate, C)  # C = unknown
    graph = read_graph(run_dir, rows, lc.vote_k)
    winner, confidence = _vote(graph, vote_class, C)
    labels = np.asarray([*names, UNKNOWN], dtype=object)[winner]
    labels[confidence < lc.min_confidence] = UNKNOWN
    writer = LabelWriter(run_dir)
    for uri, span in rows.shards():
        writer.write(
            uri, rows.ids[span], labels[span], confidence[span], ["refs"] * (span.stop - span.start)
        )
    record: dict[str, Any] = {
        "mode": "refs",
        "refs": lc.refs,
        "reference_images": {name: len(refs[name]) for name in names},
        "thresholds": {name: round(float(t), 5) for name, t in zip(names, thresholds, strict=True)},
        "reference_similarity": {
            name: None if np.isnan(s) else round(float(s), 5)
            for name, s in zip(names, ref_sim, strict=True)
        },
        "background_similarity": {
            name: round(float(b), 5) for name, b in zip(names, background, strict=True)
        },
        "rows": len(rows),
        "labels_written": writer.written,
        "classes": writer.summary(),
        "graph_vote": graph is not None,
    }
    if len(centroid_sums):
        assert clusters is not None
        record["clusters"] = _cluster_labels(
            centroid_sums, protos, thresholds, names, clusters, labels
        )
    return record


def _candidates(
    rows: RunRows, protos: np.ndarray, clusters: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the embeddings: each row's nearest prototype int64 (n,) and its cosine
    float32 (n,), each class's background similarity (C,) (the median over a seeded sample of
    rows), and each cluster's sum of embeddings float64 (k, D) (k = 0 without clusters)."""
    n = len(rows)
    candidate = np.empty(n, dtype=np.int64)
    best_sim = np.empty(n, dtype=np.float32)
    sample = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    sample[rng.choice(n, size=min(n, _BACKGROUND_SAMPLE), replace=False)] = True
    background_sims = []
    k = int(clusters.max()) + 1 if clusters is not None and (clusters >= 0).any() else 0
    centroid_sums = np.zeros((k, rows.dim), dtype=np.float64)
    for _, span, vectors in rows.embeddings():
        sims = vectors @ protos.T
        candidate[span] = np.argmax(sims, axis=1)
        best_sim[span] = sims.max(axis=1)
        background_sims.append(sims[sample[span]])
        if k:
            assert clusters is not None
            c = clusters[span]
            ok = c >= 0
            _add_by_cluster(centroid_sums, c[ok], vectors[ok])
    background = np.median(np.concatenate(background_sims), axis=0)
    return candidate, best_sim, background, centroid_sums


def _add_by_cluster(sums: np.ndarray, clusters: np.ndarray, vectors: np.ndarray) -> None:
    """sums[c] += the rows of cluster c, for every c of ``clusters`` int (m,), in one sorted
    pass (``np.add.at`` over 10^7 rows x 256 would take minutes)."""
    if not len(clusters):
        return
    order = np.argsort(clusters, kind="stable")
    sorted_clusters = clusters[order]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]])
    block = np.add.reduceat(vectors[order].astype(np.float64), starts, axis=0)
    sums[sorted_clusters[starts]] += block


_VOTE_BLOCK = 65_536  # rows whose (rows, classes + 1) vote matrix is dense at once


def _vote(
    graph: tuple[Any, str] | None, vote_class: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(winning class int (n,), its share of the vote float32 (n,)) of a vote over each row and
    its graph neighbours (weighted by similarity, the row itself by 1) among their classes
    ``vote_class`` int (n,) in 0..classes (``classes`` = unknown)."""
    n = len(vote_class)
    if graph is None:
        log.warning("label: the run has no kNN graph; each image keeps its own candidate")
        return np.asarray(vote_class), np.ones(n, dtype=np.float32)
    import scipy.sparse as sp

    g = graph[0].copy()
    g.data = np.maximum(g.data, 0.0) if graph[1] == "cosine" else np.ones_like(g.data)
    onehot = sp.csr_matrix(
        (np.ones(n, dtype=np.float32), (np.arange(n), vote_class)), shape=(n, classes + 1)
    )
    winner = np.empty(n, dtype=np.int64)
    share = np.empty(n, dtype=np.float32)
    # Block by block: the whole vote matrix is n x (classes + 1) floats (40 GB at 10^7 rows
    # and 1,000 classes).
    for s in range(0, n, _VOTE_BLOCK):
        block = slice(s, min(n, s + _VOTE_BLOCK))
        votes = np.asarray((g[block] @ onehot + onehot[block]).todense(), dtype=np.float32)
        votes /= votes.sum(axis=1, keepdims=True)
        winner[block] = np.argmax(votes, axis=1)
        share[block] = votes[np.arange(len(votes)), winner[block]]
    return winner, share


def _cluster_labels(
    sums: np.ndarray,
    protos: np.ndarray,
    thresholds: np.ndarray,
    names: list[str],
    clusters: np.ndarray,
    labels: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Per cluster: nearest prototype of its centroid (or unknown), similarity, agreement."""
    out = {}
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = sums / np.maximum(norms, 1e-12)
    sims = centroids @ protos.T.astype(np.float64)
    # Each cluster's rows from one sort, not one scan of every row per cluster.
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.arange(len(sums) + 1))
    for c in range(len(sums)):
        members = order[bounds[c] : bounds[c + 1]]
        size = len(members)
        if not size:
            continue
        best = int(np.argmax(sims[c]))
        name = names[best] if sims[c, best] >= thresholds[best] else UNKNOWN
        out[str(c)] = {
            "label": name,
            "similarity": round(float(sims[c, best]), 5),
            "size": size,
            "image_agreement": round(float(np.mean(labels[members] == name)), 5),
        }
    return out
