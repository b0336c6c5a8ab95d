"""What ``semclust serve`` answers from: a run's index, clusters, labels, names and kNN graph,
loaded once and looked up by index row.

Everything is keyed by the index's rows (``index/ids.parquet``, rows numbered in shard order):
one sorted copy of the image ids finds an id's row, and per-row arrays hold each row's cluster,
distance to its centroid and label. At 10^6 images that is about 40 MB besides the index; the
kNN graph (``knn/``) adds 12 bytes per neighbour. The embeddings are never read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import yaml

from semclust import runinfo, storage
from semclust.config import StorageConfig
from semclust.embed.decode import DEFAULT_MAX_PIXELS
from semclust.errors import UserError
from semclust.index.search import SearchIndex
from semclust.label.common import UNKNOWN
from semclust.label.names import read_names
from semclust.report.facts import is_spherical
from semclust.rundir import layout
from semclust.rundir.tables import read_assignments, read_knn

log = logging.getLogger(__name__)

NAMES_FILE = "names.yaml"  # cluster id -> name, the format ``semclust label --names`` reads
MAX_NAME_LENGTH = 200


class NotFound(LookupError):
    """An id the run does not have (an HTTP 404)."""


class Forbidden(PermissionError):
    """A URI outside the run's image sources (an HTTP 403)."""


class BadQuery(ValueError):
    """A query the service cannot use: not an image, a wrong vector (an HTTP 400)."""


@dataclass(frozen=True)
class ClusterStats:
    id: int
    size: int
    mean_distance: float | None
    cohesion: float | None  # mean cosine to the centroid (spherical), else mean squared distance
    name: str | None  # a person's name for it (names.yaml)
    label: str | None  # the most frequent label of its members (labels/)
    label_share: float | None


class RunCatalog:
    """A run directory's index and tables in memory, answering the service's questions."""

    def __init__(
        self,
        run_dir: str,
        *,
        assignments: str = "kmeans",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
        storage_config: StorageConfig | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.run_dir = run_dir
        self.storage_config = storage_config or storage.options()
        self.max_pixels = max_pixels
        with storage.using(self.storage_config):
            self.info = runinfo.load(run_dir)
            self.index = SearchIndex(run_dir, nprobe=nprobe, ef_search=ef_search, device=device)
            self.n = int(self.index.index.ntotal)
            self._id_order = np.argsort(self.index.image_ids, kind="stable")
            self._sorted_ids = self.index.image_ids[self._id_order]
            self.assignments = assignments
            self._load_clusters(assignments)
            self._load_labels()
            self.names_uri = storage.join(run_dir, NAMES_FILE)
            self.names: dict[int, str] = {}
            if self.k and storage.exists(self.names_uri):
                self.names = read_names(self.names_uri, self.k)
            self._load_knn()
        self.input_root = self._input_root()
        self._names_lock = threading.Lock()

    # --- loading -------------------------------------------------------------------------------

    def _load_clusters(self, method: str) -> None:
        self.row_cluster = np.full(self.n, -1, dtype=np.int32)
        self.row_distance = np.full(self.n, np.nan, dtype=np.float32)
        self.k = 0
        self.spherical = True
        self.score_kind = "cosine"
        folder = layout.assignments_of(method)
        if not storage.list_shards(storage.join(self.run_dir, folder)):
            if method != "kmeans":
                raise UserError(
                    f"{self.run_dir!r} has no {folder}/: run `semclust refine --method {method}` "
                    "or serve the k-means clusters (leave --assignments out)"
                )
            log.info("%s has no clusters yet: /clusters answers 404", self.run_dir)
            self._members = np.empty(0, dtype=np.int64)
            self._starts = np.zeros(1, dtype=np.int64)
            return
        table = read_assignments(self.run_dir, folder)
        rows = self.rows_of(table.column("image_id").to_numpy())
        known = rows >= 0
        clusters = table.column("cluster").to_numpy().astype(np.int32)
        self.row_cluster[rows[known]] = clusters[known]
        self.row_distance[rows[known]] = table.column("distance").to_numpy()[known]
        kmeans = storage.read_json(storage.join(self.run_dir, "model", "kmeans.json"))
        self.spherical = is_spherical(self.info.get("config", {}), kmeans)
        # k-means distances are squared L2 (2 - 2 cos on unit rows); a head's are 1 - p.
        self.score_kind = (
            "confidence" if method != "kmeans" else "cosine" if self.spherical else "distance"
        )
        self.k = max(int(kmeans.get("k") or 0), int(clusters.max(initial=-1)) + 1)
        # Members of each cluster nearest its centroid first: one sort, then offsets.
        assigned = np.flatnonzero(self.row_cluster >= 0)
        order = np.lexsort((self.row_distance[assigned], self.row_cluster[assigned]))
        self._members = assigned[order]
        self._starts = np.searchsorted(self.row_cluster[self._members], np.arange(self.k + 1))
        self.sizes = np.diff(self._starts)
        sums = np.bincount(
            self.row_cluster[assigned], weights=self.row_distance[assigned], minlength=self.k
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean_distance = np.where(self.sizes > 0, sums / np.maximum(self.sizes, 1), np.nan)

    def _load_labels(self) -> None:
        from semclust.rundir.labels import read_labels

        self.row_label = np.full(self.n, -1, dtype=np.int32)
        self.label_names: list[str] = []
        self.cluster_label: dict[int, tuple[str, float]] = {}
        self.label_code: dict[str, int] = {}
        table = read_labels(self.run_dir, ("image_id", "label", "confidence"))
        if table is None or table.num_rows == 0:
            return
        rows = self.rows_of(table.column("image_id").to_numpy())
        encoded = pc.dictionary_encode(table.column("label")).combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        self.label_names = [str(v) for v in encoded.dictionary.to_pylist()]
        conf = table.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
        conf = np.where(np.isnan(conf), -np.inf, conf)
        keep = rows >= 0
        rows, codes, conf = rows[keep], codes[keep], conf[keep]
        # An image labelled by several sources shows its most confident label.
        order = np.lexsort((-conf, rows))
        first = np.ones(len(order), dtype=bool)
        first[1:] = rows[order][1:] != rows[order][:-1]
        best = order[first]
        self.row_label[rows[best]] = codes[best]
        self.label_code = {name: i for i, name in enumerate(self.label_names)}
        if not self.k:
            return
        labelled = np.flatnonzero((self.row_label >= 0) & (self.row_cluster >= 0))
        n_labels = len(self.label_names)
        keys = self.row_cluster[labelled].astype(np.int64) * n_labels + self.row_label[labelled]
        uniq, counts = np.unique(keys, return_counts=True)
        cluster, code = uniq // n_labels, uniq % n_labels
        totals = np.bincount(cluster, weights=counts, minlength=self.k)
        # Most images first, then the label name: ties broken the same way every time.
        name_rank = np.argsort(np.argsort(np.asarray(self.label_names, dtype=object)))
        order = np.lexsort((name_rank[code], -counts, cluster))
        first = np.ones(len(order), dtype=bool)
        first[1:] = cluster[order][1:] != cluster[order][:-1]
        for i in order[first].tolist():
            c = int(cluster[i])
            self.cluster_label[c] = (self.label_names[code[i]], float(counts[i] / totals[c]))

    def _load_knn(self) -> None:
        self.knn: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        try:
            ids, neighbors, sims = read_knn(self.run_dir)
        except UserError:
            log.info("%s has no kNN graph: /images/{id}/neighbors answers 404", self.run_dir)
            return
        order = np.argsort(ids, kind="stable")
        self.knn = (ids[order], neighbors[order], sims[order])

    def _input_root(self) -> str | None:
        """The folder or prefix the run's images were listed from (not a manifest file)."""
        given = (self.info.get("config", {}).get("embed") or {}).get("input")
        if not given:
            return None
        root = storage.canonical_uri(str(given))
        with storage.using(self.storage_config):
            try:
                return root if storage.is_dir(root) else None
            except OSError:
                return None

    # --- lookups -------------------------------------------------------------------------------

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Index rows of image ids int64 (n,); -1 where an id is not in the index."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if not len(self._sorted_ids):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[pos] == ids, self._id_order[pos], -1)

    def row_of(self, image_id: int) -> int:
        if not 0 <= image_id < 1 << 63:  # ids are 63-bit; anything else is no id of ours
            raise NotFound(f"image_id {image_id} is not in this run")
        row = int(self.rows_of(np.array([image_id], dtype=np.int64))[0])
        if row < 0:
            raise NotFound(f"image_id {image_id} is not in this run")
        return row

    def describe_rows(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """image_id, uri, cluster and label of index rows."""
        rows = np.asarray(rows, dtype=np.int64)
        uris = self.index.uris.take(rows).to_pylist() if len(rows) else []
        out = []
        for row, uri in zip(rows.tolist(), uris, strict=True):
            cluster = int(self.row_cluster[row])
            code = int(self.row_label[row])
            image_id = int(self.index.image_ids[row])
            out.append(
                {
                    "image_id": image_id,
                    # The id as text for JavaScript, whose numbers hold 53 bits, not 63.
                    "image_ref": str(image_id),
                    "uri": uri,
                    "frame_time": self.frame_time_of_row(row),
                    "cluster": cluster if cluster >= 0 else None,
                    "label": self.label_names[code] if code >= 0 else None,
                }
            )
        return out

    def image_uri(self, image_id: int) -> str:
        return str(self.index.uris[self.row_of(image_id)].as_py())

    def frame_time_of_row(self, row: int) -> float | None:
        """A video frame's time (seconds), None for a still image."""
        t = float(self.index.frame_times[row])
        return None if t != t else t  # NaN: a still image

    def frame_time(self, image_id: int) -> float | None:
        return self.frame_time_of_row(self.row_of(image_id))

    # --- clusters ------------------------------------------------------------------------------

    def score(self, distance: float) -> float:
        """A member's (or a cluster's mean) distance as the figure people read: the cosine to
        the centroid (spherical k-means), the head's probability (1 - distance), or minus the
        squared distance."""
        if self.score_kind == "cosine":
            return 1.0 - distance / 2.0
        if self.score_kind == "confidence":
            return 1.0 - distance
        return -distance

    @property
    def cohesion_name(self) -> str:
        return {
            "cosine": "mean cosine to the centroid",
            "confidence": "mean probability of the cluster under the head",
            "distance": "minus the mean squared distance to the centroid",
        }[self.score_kind]

    def check_cluster(self, cluster: int) -> None:
        if not self.k:
            raise NotFound("this run has no clusters yet: run `semclust cluster`")
        if not 0 <= cluster < self.k:
            raise NotFound(f"cluster {cluster} is not one of this run's clusters 0..{self.k - 1}")

    def cluster_stats(self, cluster: int) -> ClusterStats:
        self.check_cluster(cluster)
        mean = float(self.mean_distance[cluster]) if self.sizes[cluster] else None
        label = self.cluster_label.get(cluster)
        return ClusterStats(
            id=cluster,
            size=int(self.sizes[cluster]),
            mean_distance=mean,
            cohesion=self.score(mean) if mean is not None else None,
            name=self.names.get(cluster),
            label=label[0] if label else None,
            label_share=label[1] if label else None,
        )

    def clusters(self, sort: str, descending: bool) -> list[ClusterStats]:
        if not self.k:
            raise NotFound("this run has no clusters yet: run `semclust cluster`")
        stats = [self.cluster_stats(c) for c in range(self.k)]

        def key(s: ClusterStats) -> Any:
            value = getattr(s, sort)
            missing = value is None
            # Missing values (no members, no label) go last in either direction.
            return (missing != descending, value if not missing else 0, s.id)

        if sort == "id":
            return sorted(stats, key=lambda s: s.id, reverse=descending)
        if sort in ("name", "label"):
            named = [s for s in stats if getattr(s, sort) is not None]
            rest = [s for s in stats if getattr(s, sort) is None]
            named.sort(key=lambda s: (str(getattr(s, sort)).lower(), s.id), reverse=descending)
            return named + rest
        return sorted(stats, key=key, reverse=descending)

    def members(self, cluster: int, offset: int, limit: int) -> list[dict[str, Any]]:
        """A page of a cluster's members, nearest its centroid first."""
        self.check_cluster(cluster)
        start, end = int(self._starts[cluster]), int(self._starts[cluster + 1])
        rows = self._members[start + offset : min(end, start + offset + limit)]
        out = self.describe_rows(rows)
        for d, row in zip(out, rows.tolist(), strict=True):
            dist = float(self.row_distance[row])
            d["distance"] = dist
            d["similarity"] = self.score(dist)
        return out

    def set_name(self, cluster: int, name: str | None) -> dict[int, str]:
        """Name a cluster (``None``: remove its name) and write every name to names.yaml."""
        self.check_cluster(cluster)
        if name is not None:
            name = name.strip()
            if not name:
                raise BadQuery("a cluster name must not be empty (DELETE removes a name)")
            if len(name) > MAX_NAME_LENGTH:
                raise BadQuery(f"a cluster name has at most {MAX_NAME_LENGTH} characters")
            if name == UNKNOWN:
                raise BadQuery(f"{UNKNOWN!r} is reserved for images no rule could label")
            if any(ch in name for ch in "\r\n\x00"):
                raise BadQuery("a cluster name is one line of text")
        with self._names_lock:
            names = dict(self.names)
            if name is None:
                names.pop(cluster, None)
            else:
                names[cluster] = name
            text = yaml.safe_dump(
                {c: names[c] for c in sorted(names)}, allow_unicode=True, sort_keys=False
            )
            with storage.using(self.storage_config):
                if names:
                    storage.write_bytes(self.names_uri, text.encode("utf-8"))
                else:  # no names left: no file (an empty mapping is not a names file)
                    storage.remove_tree(self.names_uri)
            self.names = names
            return dict(names)

    # --- images and neighbours -----------------------------------------------------------------

    def image_bytes(self, image_id: int) -> bytes:
        """The original's bytes; for a video frame, the frame as a JPEG at the video's size (at
        most 1024 px)."""
        uri = self.image_uri(image_id)
        frame_time = self.frame_time(image_id)
        if frame_time is not None:
            from semclust.embed.video import probe
            from semclust.report.thumbs import make_frame_thumbnail

            with storage.using(self.storage_config):
                try:
                    info = probe(uri)
                    box = min(1024, max(16, info.width, info.height))
                    return make_frame_thumbnail(uri, frame_time, box, self.max_pixels)
                except ValueError as exc:
                    raise NotFound(f"image {image_id} ({uri}) cannot be shown: {exc}") from None
        with storage.using(self.storage_config):
            try:
                return storage.read_bytes(uri)
            except FileNotFoundError:
                raise NotFound(f"image {image_id} ({uri}) is no longer there") from None

    def neighbors(self, image_id: int, k: int | None) -> list[dict[str, Any]]:
        """The image's neighbours in ``knn/``, nearest first."""
        if self.knn is None:
            raise NotFound("this run has no kNN graph: run `semclust graph`")
        self.row_of(image_id)  # a NotFound for an id the run does not have
        ids, neighbors, sims = self.knn
        pos = int(np.searchsorted(ids, image_id))
        if pos >= len(ids) or ids[pos] != image_id:
            raise NotFound(f"image_id {image_id} has no row in knn/ (rebuild the graph)")
        found = neighbors[pos] >= 0
        nb, sim = neighbors[pos][found][:k], sims[pos][found][:k]
        rows = self.rows_of(nb)
        described = self.describe_rows(rows[rows >= 0])
        sim = sim[rows >= 0]
        return [
            {"rank": r + 1, **d, "similarity": float(s)}
            for r, (d, s) in enumerate(zip(described, sim, strict=True))
        ]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "run_dir": self.run_dir,
            "images": self.n,
            "clusters": self.k,
            "assignments": self.assignments,
            "labels": len(self.label_names),
            "knn": self.knn is not None and int(self.knn[1].shape[1]),
            "index": self.index.spec.factory,
            "backbone": self.index.meta["embedder"]["backbone"],
        }
