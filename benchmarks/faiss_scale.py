"""How semclust's FAISS stages scale with N, against scikit-learn, in one run on the same data.

Three parts, all on seeded synthetic embeddings (L2-normalised rows around 1,000 planted
centres, like pooled CNN features of a varied image set):

- k-means: semclust (FAISS, greedy k-means++ seeding, Lloyd on every row) and semclust's stage
  default (train on 256 x k sampled rows, then assign every row) vs scikit-learn ``KMeans`` (same
  k, ``max_iter``, ``n_init=1``, Lloyd); time, inertia on all rows, ratio to scikit-learn;
- exact kNN graph (k=10, cosine): FAISS flat search vs scikit-learn ``NearestNeighbors``
  (``algorithm="brute"``); and semclust's IVF graph (nprobe 16) with its recall@10 against exact
  search on 1,000 rows, where exact scikit-learn would take too long;
- index: build time, recall@10 against exact search and queries per second (a batch of 1,000
  held-out queries, and one query at a time) for Flat, IVF-Flat, IVF-PQ and HNSW.

For each method, ``growth`` is the log-log slope of time against N between successive sizes
(1: linear, 2: quadratic). Ratios are measured within the run: this machine's speed drifts.

    python benchmarks/faiss_scale.py                       # the full run (~20 min on 2 cores)
    python benchmarks/faiss_scale.py --quick               # a smoke run (~1 min)
    python benchmarks/faiss_scale.py --results-md benchmarks/RESULTS.md   # also write figures
"""

from __future__ import annotations

import os

# Sleeping (not spinning) OpenMP waits, as semclust's Ray workers use, for FAISS and for
# scikit-learn alike; must be set before either library loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import datetime
import itertools
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

K_MEANS_K = 100
K_MEANS_ITER = 20
KNN_K = 10
CENTRES = 1_000


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """float32 (n, dim) unit rows around CENTRES random unit centres (offset norm about 0.8)."""
    return synthetic_labelled(n, dim, seed)[0]


def synthetic_labelled(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``synthetic``'s rows and the index of each row's planted centre, int32 (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int32)
    for s in range(0, n, 100_000):  # blocks keep the float temporaries small
        m = min(100_000, n - s)
        labels[s : s + m] = rng.integers(0, CENTRES, m)
        block = centres[labels[s : s + m]]
        block += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.8 / math.sqrt(dim))
        out[s : s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, labels


THREADS = os.cpu_count() or 1  # set from --threads in run()


@contextlib.contextmanager
def sklearn_threads(kmeans: bool) -> Iterator[None]:
    """scikit-learn at THREADS threads, in the set-up it is meant to run in.

    KMeans parallelises with OpenMP over chunks and calls BLAS inside each chunk: BLAS must then
    run single-threaded (left at its default here, two BLAS copies oversubscribed the 2 cores and
    KMeans ran 10-20x slower). NearestNeighbors' brute force is one BLAS product per chunk.
    """
    from threadpoolctl import threadpool_limits

    if kmeans:
        with (
            threadpool_limits(limits=1, user_api="blas"),
            threadpool_limits(limits=THREADS, user_api="openmp"),
        ):
            yield
    else:
        with threadpool_limits(limits=THREADS):
            yield


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over rows of the squared L2 distance to the nearest centroid (FAISS, exact)."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, _ = index.search(x, 1)
    return float(dist.sum(dtype=np.float64))


def bench_kmeans(x: np.ndarray) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    from semclust.clustering.kmeans import CentroidAssigner, faiss_kmeans
    from semclust.clustering.model import KMeansModel
    from semclust.clustering.pca import RowTransform

    n = len(x)
    common = {"niter": K_MEANS_ITER, "nredo": 1, "spherical": False, "seed": 0}
    full, t_full = timed(faiss_kmeans, x, K_MEANS_K, init="kmeans++", **common)
    # The stage's default: a 256 x k sample, then every row assigned (here in one process).
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, min(n, 256 * K_MEANS_K), replace=False))]
    start = time.perf_counter()
    sampled = faiss_kmeans(sample, K_MEANS_K, init="kmeans++", **common)
    model = KMeansModel(RowTransform(spherical=False), sampled)
    CentroidAssigner(model).assign(x)
    t_sampled = time.perf_counter() - start
    sk = KMeans(K_MEANS_K, max_iter=K_MEANS_ITER, n_init=1, algorithm="lloyd", random_state=0)
    with sklearn_threads(kmeans=True):
        _, t_sk = timed(sk.fit, x)
    ref = inertia(x, sk.cluster_centers_)
    return {
        "n": n,
        "semclust_all_rows_s": round(t_full, 3),
        "semclust_stage_default_s": round(t_sampled, 3),
        "sklearn_s": round(t_sk, 3),
        "sklearn_over_semclust_all_rows": round(t_sk / t_full, 2),
        "sklearn_over_semclust_stage_default": round(t_sk / t_sampled, 2),
        "sklearn_iterations": int(sk.n_iter_),
        # scikit-learn stops early once labels stop changing; FAISS runs every iteration.
        "semclust_all_rows_s_per_iteration": round(t_full / K_MEANS_ITER, 4),
        "sklearn_s_per_iteration": round(t_sk / max(1, int(sk.n_iter_)), 4),
        "inertia_ratio_all_rows": round(inertia(x, full) / ref, 4),
        "inertia_ratio_stage_default": round(inertia(x, sampled) / ref, 4),
    }


def faiss_exact_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN graph (self excluded) as semclust's exact graph actor computes it."""
    import faiss

    from semclust.clustering.knn import drop_self

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows = np.arange(len(x))
    out_i = np.empty((len(x), k), dtype=np.int64)
    out_s = np.empty((len(x), k), dtype=np.float32)
    for s in range(0, len(x), 4096):
        sims, idx = index.search(x[s : s + 4096], k + 1)
        out_i[s : s + 4096], out_s[s : s + 4096] = drop_self(rows[s : s + 4096], idx, sims, k)
    return out_i, out_s


def ivf_graph(x: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    """semclust's IVF graph path: IVF-Flat trained on a sample, every row queried."""
    from semclust.clustering.knn import drop_self
    from semclust.index.exact import similarity_space
    from semclust.index.factory import IndexSpec, auto_nlist

    spec = IndexSpec("ivf_flat", x.shape[1], "cosine", nlist=auto_nlist(len(x)))
    start = time.perf_counter()
    index = spec.new_index()
    rng = np.random.default_rng(1)
    index.train(x[rng.choice(len(x), min(len(x), 64 * spec.nlist), replace=False)])
    index.add(similarity_space(x, "cosine"))
    build = time.perf_counter() - start
    index.nprobe = nprobe
    rows = np.arange(len(x))
    out = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), 4096):
        dist, idx = index.search(x[s : s + 4096], k + 1)
        out[s : s + 4096] = drop_self(rows[s : s + 4096], idx, dist, k)[0]
    total = time.perf_counter() - start
    return out, total, {"nlist": spec.nlist, "nprobe": nprobe, "build_s": round(build, 3)}


def graph_recall(x: np.ndarray, graph: np.ndarray, k: int, sample: int = 1_000) -> float:
    """recall@k of graph rows against exact search on ``sample`` seeded rows."""
    import faiss

    rng = np.random.default_rng(2)
    rows = rng.choice(len(x), min(sample, len(x)), replace=False)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x[rows], k + 1)
    truth = np.array([[j for j in r if j != i][:k] for i, r in zip(rows, idx, strict=True)])
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(graph[rows], truth, strict=True))
    return hits / (k * len(rows))


def bench_graph(x: np.ndarray, with_exact: bool, with_sklearn: bool) -> dict[str, Any]:
    from sklearn.neighbors import NearestNeighbors

    out: dict[str, Any] = {"n": len(x)}
    if with_exact:
        (graph, _), t_faiss = timed(faiss_exact_graph, x, KNN_K)
        out["semclust_exact_s"] = round(t_faiss, 3)
    if with_sklearn:
        nn = NearestNeighbors(n_neighbors=KNN_K + 1, algorithm="brute", metric="cosine")
        with sklearn_threads(kmeans=False):
            start = time.perf_counter()
            nn.fit(x)
            _, sk_idx = nn.kneighbors(x)
            t_sk = time.perf_counter() - start
        # Agreement with scikit-learn (ties aside): the fraction of shared neighbours.
        sk_graph = np.array([[j for j in r if j != i][:KNN_K] for i, r in enumerate(sk_idx)])
        agree = np.mean(
            [len(np.intersect1d(a, b)) / KNN_K for a, b in zip(graph, sk_graph, strict=True)]
        )
        out.update(
            sklearn_brute_s=round(t_sk, 3),
            sklearn_over_semclust=round(t_sk / t_faiss, 2),
            neighbours_agreeing_with_sklearn=round(float(agree), 5),
        )
    graph, t_ivf, params = ivf_graph(x, KNN_K, nprobe=16)
    out.update(
        semclust_ivf_s=round(t_ivf, 3),
        semclust_ivf=params,
        semclust_ivf_recall_at_10=round(graph_recall(x, graph, KNN_K), 4),
    )
    return out


def bench_index(x: np.ndarray, queries: np.ndarray) -> list[dict[str, Any]]:
    """Build each index type on ``x`` (sample-trained, added in 50k-row shards) and query it."""
    import faiss

    from semclust.index.exact import similarity_space
    from semclust.index.factory import choose_spec
    from semclust.index.faiss_ops import set_search_params

    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    q = similarity_space(queries, "cosine")
    _, truth = exact.search(q, 10)
    rows = []
    for kind in ("flat", "ivf_flat", "ivf_pq", "hnsw"):
        spec = choose_spec(len(x), x.shape[1], "cosine", kind=kind, pq_m=x.shape[1] // 8)
        start = time.perf_counter()
        index = spec.new_index()
        if not index.is_trained:
            rng = np.random.default_rng(3)
            index.train(x[rng.choice(len(x), min(len(x), 64 * spec.nlist), replace=False)])
        for s in range(0, len(x), 50_000):
            index.add(x[s : s + 50_000])
        build = time.perf_counter() - start
        set_search_params(index, nprobe=16, ef_search=64)
        (_, found), t_batch = timed(index.search, q, 10)
        one_at_a_time = []
        for i in range(200):
            t0 = time.perf_counter()
            index.search(q[i : i + 1], 10)
            one_at_a_time.append(time.perf_counter() - t0)
        recall = np.mean(
            [len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)]
        )
        rows.append(
            {
                "type": kind,
                "factory": spec.factory,
                "n": len(x),
                "build_s": round(build, 3),
                "memory_estimate_mb": round(spec.memory_bytes(len(x)) / 2**20, 1),
                "recall_at_10": round(float(recall), 4),
                "qps_batch_1000": round(len(q) / t_batch, 1),
                "latency_ms_one_query_median": round(1000 * float(np.median(one_at_a_time)), 3),
            }
        )
        del index
    return rows


def growth(points: list[tuple[int, float]]) -> list[float]:
    """log-log slopes of time against N between successive sizes."""
    return [
        round(math.log(t1 / t0) / math.log(n1 / n0), 2)
        for (n0, t0), (n1, t1) in itertools.pairwise(points)
        if t0 > 0 and t1 > 0
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import sklearn
    from threadpoolctl import threadpool_info

    global THREADS
    threads = THREADS = args.threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "blas": sorted({i.get("internal_api", "?") for i in threadpool_info()}),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "sklearn_threads": "KMeans: OpenMP at `threads`, BLAS 1; NearestNeighbors: all at "
            "`threads`",
            "load_average_at_start": os.getloadavg(),
        },
        "kmeans": {},
        "graph": {},
        "index": {},
    }
    for dim, sizes in args.kmeans:
        rows = []
        for n in sizes:
            x = synthetic(n, dim, seed=n + dim)
            rows.append(bench_kmeans(x))
            log(f"k-means d={dim} n={n}: {rows[-1]}")
        result["kmeans"][str(dim)] = {
            "k": K_MEANS_K,
            "iterations": K_MEANS_ITER,
            "rows": rows,
            "growth": {
                key: growth([(r["n"], r[key]) for r in rows])
                for key in ("semclust_all_rows_s", "semclust_stage_default_s", "sklearn_s")
            },
        }
    for dim, sizes, exact_max, sk_max in args.graph:
        rows = []
        for n in sizes:
            x = synthetic(n, dim, seed=7 * n + dim)
            rows.append(bench_graph(x, with_exact=n <= exact_max, with_sklearn=n <= sk_max))
            log(f"graph d={dim} n={n}: {rows[-1]}")
        keys = ("semclust_exact_s", "sklearn_brute_s", "semclust_ivf_s")
        result["graph"][str(dim)] = {
            "k": KNN_K,
            "rows": rows,
            "growth": {key: growth([(r["n"], r[key]) for r in rows if key in r]) for key in keys},
        }
    for dim, n in args.index:
        data = synthetic(n + 1_000, dim, seed=11 * n + dim)
        result["index"][str(dim)] = bench_index(data[:n], data[n:])
        log(f"index d={dim} n={n}: {result['index'][str(dim)]}")
    result["seconds"] = round(time.perf_counter() - START, 1)
    return result


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def results_markdown(result: dict[str, Any]) -> str:
    """The ``## faiss_scale`` section of RESULTS.md for one run."""
    m = result["machine"]
    lines = [
        "## faiss_scale",
        "",
        f"{result['date']}, `{result['command']}` ({result['seconds']:.0f} s), {m['cpus']} cores "
        f"({m['threads']} threads), no GPU; faiss-cpu {m['faiss']}, scikit-learn {m['sklearn']}, "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; scikit-learn's KMeans with BLAS at 1 thread "
        "inside its OpenMP loop (its default oversubscribed the cores here, 10-20x slower); "
        "load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average_at_start'])} (a shared, noisy machine: "
        "compare ratios within the run, not seconds across runs). Synthetic unit vectors around "
        f"{CENTRES} centres. GPU paths exist (faiss-gpu) but were not measured here.",
        "",
        f"k-means, k={K_MEANS_K}, {K_MEANS_ITER} iterations, n_init=1. *all rows*: semclust's "
        "FAISS k-means on every row; *stage default*: trained on 256 x k sampled rows, then every "
        "row assigned. Inertia relative to scikit-learn's (lower is better).",
        "",
        "| d | N | semclust all rows s | stage default s | sklearn s (iterations) "
        "| sklearn / all rows | sklearn / default | per iteration: sklearn / semclust "
        "| inertia all rows | inertia default |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dim, block in result["kmeans"].items():
        for r in block["rows"]:
            lines.append(
                f"| {dim} | {r['n']:,} | {r['semclust_all_rows_s']} | "
                f"{r['semclust_stage_default_s']} | {r['sklearn_s']} ({r['sklearn_iterations']}) | "
                f"{r['sklearn_over_semclust_all_rows']} | "
                f"{r['sklearn_over_semclust_stage_default']} | "
                f"{r['sklearn_s_per_iteration'] / r['semclust_all_rows_s_per_iteration']:.2f} | "
                f"{r['inertia_ratio_all_rows']} | {r['inertia_ratio_stage_default']} |"
            )
    lines += ["", "Growth of k-means time with N (log-log slope between successive sizes):", ""]
    for dim, block in result["kmeans"].items():
        lines.append(f"- d={dim}: " + _growth_text(block["growth"]))
    lines += [
        "",
        f"kNN graph, k={KNN_K}, cosine. Exact: FAISS flat vs scikit-learn NearestNeighbors "
        "(brute). IVF: semclust's approximate graph (IVF-Flat, nprobe 16), recall@10 against "
        "exact search on 1,000 rows.",
        "",
        "| d | N | semclust exact s | sklearn brute s | sklearn / semclust | agreement "
        "| semclust IVF s | IVF recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dim, block in result["graph"].items():
        for r in block["rows"]:
            lines.append(
                f"| {dim} | {r['n']:,} | {r.get('semclust_exact_s', '-')} | "
                f"{r.get('sklearn_brute_s', '-')} | {r.get('sklearn_over_semclust', '-')} | "
                f"{r.get('neighbours_agreeing_with_sklearn', '-')} | {r['semclust_ivf_s']} | "
                f"{r['semclust_ivf_recall_at_10']} |"
            )
    lines += ["", "Growth of graph time with N:", ""]
    for dim, block in result["graph"].items():
        lines.append(f"- d={dim}: " + _growth_text(block["growth"]))
    lines += [
        "",
        "Index types (trained on a sample, added in 50,000-row shards; 1,000 held-out queries; "
        "nprobe 16, efSearch 64, IVF-PQ with d/8 bytes per vector):",
        "",
        "| d | type | N | build s | memory MB | recall@10 | QPS (batch of 1,000) "
        "| one query ms (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dim, rows in result["index"].items():
        for r in rows:
            lines.append(
                f"| {dim} | {r['factory']} | {r['n']:,} | {r['build_s']} | "
                f"{r['memory_estimate_mb']} | {r['recall_at_10']} | {r['qps_batch_1000']} | "
                f"{r['latency_ms_one_query_median']} |"
            )
    return "\n".join(lines) + "\n"


def _growth_text(block: dict[str, list[float]]) -> str:
    return "; ".join(f"{key.removesuffix('_s')} {values}" for key, values in block.items())


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## faiss_scale`` section; other sections are left alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = text.find("## faiss_scale")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
        text = text.replace(section + "## ", section + "\n## ")
    path.write_text(text)


def _sizes(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--threads", type=int, help="FAISS threads (default: all cores)")
    p.add_argument("--results-md", type=Path, help="write the ## faiss_scale section here")
    args = p.parse_args(argv)
    if args.quick:
        args.kmeans = [(256, [10_000, 30_000])]
        args.graph = [(256, [5_000, 10_000], 10_000, 10_000)]
        args.index = [(64, 20_000)]
    else:
        # (dim, sizes); the graph also names the largest N of the exact FAISS graph and of
        # scikit-learn's brute force (quadratic: 100k x 256-d took it minutes here).
        args.kmeans = [(256, [10_000, 100_000, 1_000_000]), (2048, [10_000, 100_000])]
        args.graph = [
            (256, [10_000, 30_000, 100_000, 300_000], 100_000, 30_000),
            (2048, [10_000, 30_000], 30_000, 10_000),
        ]
        args.index = [(256, 100_000)]
    return args


START = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.results_md:
        write_section(args.results_md, results_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
