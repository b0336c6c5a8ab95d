"""Scale: semclust's FAISS stages through the CLI at 10^5 to 10^7 rows, against what a user would
write by hand, in one run on the same data (this machine is noisy: compare ratios within a run).

For each size N a seeded synthetic run directory is written (``embeddings/`` shards of 50,000
L2-normalised 256-d rows around 1,000 planted centres, as benchmarks/faiss_scale.py; 1 GB per
million rows), then each stage asked for runs as ``semclust STAGE --run-dir D`` in a fresh
process, timed, with the peak resident memory of the driver and of the largest other process of
its tree (Ray's raylet, workers and actors) sampled every 0.2 s from /proc.

Baselines, in the same run:

- graph, hand-written FAISS (``faiss_ivf``): read the shards with pyarrow, ``IVF{4 sqrt N},Flat``
  trained on 64 rows per list, every row added, and one ``index.search`` of every row with the
  smallest nprobe (1, 2, 4, ...) whose recall@10 reaches semclust's measured recall: that nprobe
  is found first, untimed, so the baseline is given its tuning for free;
- cluster, hand-written FAISS (``faiss_kmeans``): read the shards with pyarrow,
  ``faiss.Kmeans(d, 1000, niter=20, spherical=True)`` trained on every row (FAISS subsamples
  256 per centroid itself, as semclust does), then ``km.index.search`` of every row and the
  labels written to Parquet. Both objectives are the mean squared distance of every row to its
  centroid (semclust's from its ``assignments/``);
- graph, a well-kept kNN library (``--library hnswlib``, when installed): ``hnswlib`` HNSW
  (M=16, ef_construction=100) over every row, then ``knn_query`` of every row with the smallest ef
  reaching the same recall (likewise tuned untimed).

Recall@10 of every graph is measured here on the same 1,000 seeded rows against exact search.
``growth`` is the log-log slope of time against N between successive sizes.

    python benchmarks/scale_10m.py                                   # 10^5, 10^6, 1.6M; graph
    python benchmarks/scale_10m.py --sizes 100000 1000000 10000000 --stages cluster graph index
    python benchmarks/scale_10m.py --sizes 20000 50000 --work /tmp/scale   # smoke run (~3 min)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as semclust's Ray workers run FAISS

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from faiss_scale import synthetic_labelled  # noqa: E402

DIM = 256
K = 10
SHARD_ROWS = 50_000
RECALL_ROWS = 1_000
SEED_SHARE = 0.01  # the label stage's seed labels: 1% of the rows, as quality_fmnist
TRUTH_SCHEMA = pa.schema([("uri", pa.string()), ("label", pa.string())])


def write_run_dir(run_dir: Path, n: int, seed: int) -> None:
    """A run directory of N synthetic rows in shards (written chunk by chunk, never all in
    memory at once above a few GB), and beside it the planted truth: ``truth.parquet`` (uri,
    label: every row's centre) and ``seeds.parquet`` (a seeded SEED_SHARE of it, the label
    stage's seed labels)."""
    import pyarrow.parquet as pq
    from tests.clustering.synthetic import EMBEDDER, write_run

    from semclust import runinfo

    if run_dir.exists():
        shutil.rmtree(run_dir)
    chunk = 1_000_000
    rng = np.random.default_rng(seed)
    truth_path, seeds_path = label_files(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        pq.ParquetWriter(truth_path, TRUTH_SCHEMA) as truth,
        pq.ParquetWriter(seeds_path, TRUTH_SCHEMA) as seeds,
    ):
        for c, s in enumerate(range(0, n, chunk)):
            x, centre = synthetic_labelled(min(chunk, n - s), DIM, seed * 1_000 + c)
            prefix = f"c{c:03d}"
            write_run(
                run_dir,
                x,
                rows_per_part=SHARD_ROWS,
                embedder=None,
                first_part=s // SHARD_ROWS,
                prefix=prefix,
            )
            del x
            # The URIs write_run gives its rows; each chunk has its own centres.
            uris = pa.array([f"file:///synthetic/{prefix}-{i:07d}.jpg" for i in range(len(centre))])
            labels = pa.array(np.char.add(f"{prefix}-", centre.astype("U4")))
            table = pa.table({"uri": uris, "label": labels}, schema=TRUTH_SCHEMA)
            truth.write_table(table)
            seeds.write_table(table.filter(pa.array(seed_rows(centre, rng))))
    record = {"status": "done", "embedded": n, "dim": DIM, "embedder": EMBEDDER.__dict__}
    runinfo.update_stage(str(run_dir), "embed", record, {})


def seed_rows(centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which rows are seed labels: a random SEED_SHARE, plus the first two of every centre (the
    label stage cross-validates, so each class needs two, as a user labels a few per class)."""
    chosen = rng.random(len(centre)) < SEED_SHARE
    order = np.argsort(centre, kind="stable")
    first = np.searchsorted(centre[order], np.arange(centre.max() + 1))
    rank = np.arange(len(centre)) - first[centre[order]]
    chosen[order[rank < 2]] = True
    return chosen


def label_files(run_dir: Path) -> tuple[Path, Path]:
    """(truth, seeds) Parquet files of a synthetic run directory, beside it (not in it)."""
    return run_dir.with_name(run_dir.name + "-truth.parquet"), run_dir.with_name(
        run_dir.name + "-seeds.parquet"
    )


def read_rows(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, float32 rows) of every shard in order, as a hand-written script reads them
    (into one preallocated array: a list of pieces and their concatenation would take twice the
    memory, 20 GB at 10^7 rows)."""
    import pyarrow.parquet as pq

    paths = sorted((run_dir / "embeddings").glob("part-*.parquet"))
    n = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    ids, rows = np.empty(n, dtype=np.int64), np.empty((n, DIM), dtype=np.float32)
    at = 0
    for path in paths:
        table = pq.read_table(path, columns=["image_id", "embedding"])
        m = table.num_rows
        ids[at : at + m] = table["image_id"].to_numpy()
        rows[at : at + m] = table["embedding"].combine_chunks().flatten().to_numpy().reshape(m, DIM)
        at += m
    return ids, rows


class TreeMemory:
    """Peak RSS of a process (the driver) and of the largest other process in its tree."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.driver = 0
        self.largest_other = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _status() -> dict[int, tuple[int, int]]:
        """pid -> (parent pid, RSS bytes) of every process readable in /proc."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = dict(
                    line.split(":", 1)
                    for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                )
                rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
                out[int(entry)] = (int(fields["PPid"]), rss)
            except (OSError, ValueError, KeyError):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = self._status()
            tree = {self.pid}
            changed = True
            while changed:
                changed = False
                for pid, (ppid, _) in procs.items():
                    if ppid in tree and pid not in tree:
                        tree.add(pid)
                        changed = True
            for pid in tree:
                rss = procs.get(pid, (0, 0))[1]
                if pid == self.pid:
                    self.driver = max(self.driver, rss)
                else:
                    self.largest_other = max(self.largest_other, rss)
            self._stop.wait(0.2)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "driver_peak_gb": round(self.driver / 2**30, 3),
            "largest_worker_peak_gb": round(self.largest_other / 2**30, 3),
        }


def run_stage(stage: str, run_dir: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "semclust.cli", stage, "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": round(seconds, 1), **memory.stop(), "exit": proc.returncode}
    if proc.returncode != 0:
        out["error"] = err[-1500:]
        return out
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    record = stages.get(stage) or stages.get(f"{stage}_scan") or {}
    # Everything but the echoed settings and per-epoch curves.
    out["record"] = {
        key: v for key, v in record.items() if key not in ("settings", "loss_curve", "classes")
    }
    return out


def exact_truth(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    _, found = index.search(x[rows], K + 1)
    return np.array([[j for j in r if j != i][:K] for i, r in zip(rows, found, strict=True)])


def recall(found_rows: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found_rows, truth, strict=True))
    return hits / (K * len(truth))


def semclust_graph_recall(
    run_dir: Path, ids: np.ndarray, rows: np.ndarray, truth: np.ndarray
) -> float:
    """recall@10 of semclust's written graph on the benchmark's own rows."""
    from semclust.rundir.tables import read_knn

    g_ids, neighbors, _ = read_knn(str(run_dir))
    order = np.argsort(ids)
    row_of_id = lambda a: order[np.searchsorted(ids[order], a)]  # noqa: E731
    where = {int(i): r for r, i in enumerate(g_ids)}
    found = np.array([row_of_id(neighbors[where[int(ids[r])]]) for r in rows])
    return recall(found, truth)


def self_removed(found: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.array([[j for j in f if j != i][:K] for i, f in zip(rows, found, strict=True)])


def faiss_ivf_baseline(
    run_dir: Path, target: float, rows: np.ndarray, truth: np.ndarray
) -> dict[str, Any]:
    """The hand-written FAISS IVF graph at the first nprobe reaching ``target`` recall."""
    import faiss

    start = time.perf_counter()
    _, x = read_rows(run_dir)
    n = len(x)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    index = faiss.index_factory(DIM, f"IVF{nlist},Flat")
    rng = np.random.default_rng(0)
    index.train(x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(x)
    build = time.perf_counter() - start
    nprobe, got = 1, 0.0
    while nprobe <= nlist:  # the tuning a user does by hand: not timed
        index.nprobe = nprobe
        got = recall(self_removed(index.search(x[rows], K + 1)[1], rows), truth)
        if got >= target:
            break
        nprobe *= 2
    start = time.perf_counter()
    for s in range(0, n, 65_536):
        index.search(x[s : s + 65_536], K + 1)
    search = time.perf_counter() - start
    return _baseline_figures(build, search, got, nlist=nlist, nprobe=nprobe)


def faiss_kmeans_baseline(run_dir: Path, k: int, seed: int) -> dict[str, Any]:
    """The hand-written FAISS k-means of every row, labels written: seconds and objective."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    ids, x = read_rows(run_dir)
    read = time.perf_counter() - start
    km = faiss.Kmeans(DIM, k, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(x)
    train = time.perf_counter() - start - read
    dist = np.empty(len(x), dtype=np.float32)
    labels = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), 65_536):
        d, i = km.index.search(x[s : s + 65_536], 1)
        dist[s : s + len(d)], labels[s : s + len(d)] = d[:, 0], i[:, 0]
    # Spherical: km.index is an inner-product index; unit rows and centroids, so the squared L2
    # distance semclust reports is 2 - 2 cos.
    dist = 2.0 - 2.0 * dist
    table = pa.table({"image_id": ids, "cluster": labels, "distance": dist})
    pq.write_table(table, run_dir / "faiss-kmeans-labels.parquet")
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 1),
        "read_s": round(read, 1),
        "train_s": round(train, 1),
        "assign_s": round(seconds - read - train, 1),
        "mean_sq_distance": round(float(dist.mean(dtype=np.float64)), 5),
    }


def semclust_kmeans_objective(run_dir: Path) -> float:
    """Mean squared distance of every row to its centroid, from semclust's assignments/."""
    import pyarrow.parquet as pq

    total, rows = 0.0, 0
    for path in sorted((run_dir / "assignments").glob("part-*.parquet")):
        dist = pq.read_table(path, columns=["distance"])["distance"].to_numpy()
        total += float(dist.sum(dtype=np.float64))
        rows += len(dist)
    return total / rows


def hnswlib_baseline(
    run_dir: Path, target: float, rows: np.ndarray, truth: np.ndarray
) -> dict[str, Any]:
    import hnswlib

    start = time.perf_counter()
    _, x = read_rows(run_dir)
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(x), M=16, ef_construction=100, random_seed=0)
    index.add_items(x, num_threads=os.cpu_count() or 1)
    build = time.perf_counter() - start
    ef, got = 16, 0.0
    while ef <= 2048:
        index.set_ef(ef)
        got = recall(self_removed(index.knn_query(x[rows], K + 1)[0], rows), truth)
        if got >= target:
            break
        ef *= 2
    start = time.perf_counter()
    index.knn_query(x, K + 1, num_threads=os.cpu_count() or 1)
    search = time.perf_counter() - start
    return _baseline_figures(build, search, got, ef=ef)


def _baseline_figures(build: float, search: float, got: float, **params: int) -> dict[str, Any]:
    """A baseline's record: total, build and search seconds, its parameters, its recall@10."""
    return {
        "seconds": round(build + search, 1),
        "build_s": round(build, 1),
        "search_s": round(search, 1),
        **params,
        "recall_at_10": round(got, 4),
    }


def growth(points: list[tuple[int, float]]) -> list[float]:
    return [
        round(math.log(t2 / t1) / math.log(n2 / n1), 3)
        for (n1, t1), (n2, t2) in itertools.pairwise(points)
        if t1 > 0 and t2 > 0
    ]


CLUSTER_K = 1000
STAGES = ("cluster", "graph", "index", "refine", "label", "evaluate", "report")
INDEX_MEMORY = "1GB"  # the budget for the index at every size


def stage_args(stage: str, run_dir: Path, cluster_k: int) -> list[str]:
    """The CLI flags each stage runs with (beyond ``--run-dir``)."""
    truth, seeds = label_files(run_dir)
    return {
        "cluster": ["--k", str(cluster_k)],
        "graph": ["--set", "graph.duplicate_threshold=none"],
        "index": ["--index-memory", INDEX_MEMORY],
        # One SCAN epoch and one self-labelling epoch: the point at this size is that it
        # streams every row through, not the head's quality (quality_fmnist measures that).
        "refine": ["--method", "scan", "--epochs", "1", "--self-label-epochs", "1"],
        "label": ["--seed-labels", str(seeds)],
        "evaluate": ["--truth", str(truth)],
        "report": [],
    }[stage]


def cluster_k_for(n: int, args: argparse.Namespace) -> int:
    return args.cluster_k_10m if n >= 10_000_000 else args.cluster_k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000, 1_600_000])
    p.add_argument("--stages", nargs="+", default=["graph"], choices=STAGES)
    p.add_argument("--cluster-k", type=int, default=CLUSTER_K, help="k below 10^7 rows")
    p.add_argument("--cluster-k-10m", type=int, default=10_000, help="k at 10^7 rows and more")
    p.add_argument(
        "--baseline-max-n",
        type=int,
        default=2_000_000,
        help="largest N for the hand-written FAISS baselines (they hold every row in memory)",
    )
    p.add_argument("--library", choices=["hnswlib", "none"], default="hnswlib")
    p.add_argument("--library-max-n", type=int, default=1_000_000, help="largest N for it")
    p.add_argument("--no-faiss-baseline", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/semclust-scale"))
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    results: list[dict[str, Any]] = []
    load = lambda: [round(v, 2) for v in os.getloadavg()]  # noqa: E731
    for n in args.sizes:
        run_dir = args.work / f"n{n}"
        t = time.perf_counter()
        write_run_dir(run_dir, n, seed=1)
        entry: dict[str, Any] = {
            "n": n,
            "write_s": round(time.perf_counter() - t, 1),
            "load_start": load(),
        }
        ids, x = read_rows(run_dir)
        rows = np.sort(np.random.default_rng(2).choice(n, min(RECALL_ROWS, n), replace=False))
        truth = exact_truth(x, rows)
        del x
        for stage in args.stages:
            extra = stage_args(stage, run_dir, cluster_k_for(n, args))
            entry[stage] = run_stage(stage, run_dir, extra, args.timeout)
            print(json.dumps({"n": n, stage: entry[stage]}), flush=True)
        baselines = not args.no_faiss_baseline and n <= args.baseline_max_n
        if "cluster" in entry and entry["cluster"]["exit"] == 0:
            entry["cluster"]["mean_sq_distance"] = round(semclust_kmeans_objective(run_dir), 5)
            if baselines:
                k = cluster_k_for(n, args)
                entry["faiss_kmeans"] = faiss_kmeans_baseline(run_dir, k, seed=1234)
                entry["cluster_over_faiss_kmeans"] = round(
                    entry["cluster"]["seconds"] / entry["faiss_kmeans"]["seconds"], 3
                )
                print(json.dumps({"n": n, "faiss_kmeans": entry["faiss_kmeans"]}), flush=True)
        if "graph" in entry and entry["graph"]["exit"] == 0:
            got = semclust_graph_recall(run_dir, ids, rows, truth)
            entry["graph"]["recall_at_10"] = round(got, 4)
            if baselines:
                entry["faiss_ivf"] = faiss_ivf_baseline(run_dir, got, rows, truth)
                entry["graph_over_faiss_ivf"] = round(
                    entry["graph"]["seconds"] / entry["faiss_ivf"]["seconds"], 3
                )
                print(json.dumps({"n": n, "faiss_ivf": entry["faiss_ivf"]}), flush=True)
            if args.library == "hnswlib" and n <= args.library_max_n:
                try:
                    entry["hnswlib"] = hnswlib_baseline(run_dir, got, rows, truth)
                    entry["graph_over_hnswlib"] = round(
                        entry["graph"]["seconds"] / entry["hnswlib"]["seconds"], 3
                    )
                except ImportError:
                    entry["hnswlib"] = "not installed (pip install hnswlib)"
                print(json.dumps({"n": n, "hnswlib": entry["hnswlib"]}), flush=True)
        entry["load_end"] = load()
        results.append(entry)
        shutil.rmtree(run_dir, ignore_errors=True)
        for path in label_files(run_dir):
            path.unlink(missing_ok=True)
    summary: dict[str, Any] = {"sizes": args.sizes, "cpus": os.cpu_count()}
    for stage in [*args.stages, "faiss_ivf", "hnswlib", "faiss_kmeans"]:
        points = sorted(
            (e["n"], e[stage]["seconds"])
            for e in results
            if isinstance(e.get(stage), dict) and e[stage].get("exit", 0) == 0
        )
        if len(points) > 1:
            summary[f"{stage}_growth"] = growth(points)
    report = {"results": results, "summary": summary}
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
