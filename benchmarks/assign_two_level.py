"""The cluster stage's nearest-centroid search for a two-level model on CPU: FAISS's per-row
IVF search against semclust's rows bucketed by coarse cell (``CentroidAssigner``, one matrix
product per cell through ``faiss.contrib.big_batch_search``), and a flat search of every
centroid, in one run on the same seeded data; prints JSON.

    python benchmarks/assign_two_level.py                     # 400,000 rows x 10,000 centroids
    python benchmarks/assign_two_level.py --rows 50000        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import faiss

    from semclust.clustering.kmeans import CentroidAssigner
    from semclust.clustering.model import KMeansModel
    from semclust.clustering.pca import RowTransform
    from semclust.index.faiss_ops import nearest_two

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--coarse", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    d = args.dim
    coarse = rng.normal(size=(args.coarse, d)).astype(np.float32)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
    parents = rng.integers(0, args.coarse, args.k)
    centroids = coarse[parents] + 0.3 * rng.normal(size=(args.k, d)).astype(np.float32) / 16
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    x = centroids[rng.integers(0, args.k, args.rows)]
    x = x + 0.5 * rng.normal(size=x.shape).astype(np.float32) / 16
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    model = KMeansModel(RowTransform(spherical=True), centroids, coarse, parents.astype(np.int32))
    assigner = CentroidAssigner(model, nprobe=args.nprobe)
    out: dict = {"rows": args.rows, "k": args.k, "coarse": args.coarse, "nprobe": args.nprobe}
    out["threads"] = faiss.omp_get_max_threads()
    start = time.perf_counter()
    per_row = nearest_two(assigner.index, x)
    out["ivf_per_row_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    bucketed = assigner.assign_model_space(x)
    out["bucketed_s"] = round(time.perf_counter() - start, 2)
    sample = slice(0, min(args.rows, 100_000))
    start = time.perf_counter()
    exact = nearest_two(assigner.exact, x[sample])
    out["flat_s_estimate"] = round((time.perf_counter() - start) * args.rows / len(x[sample]), 2)
    out["bucketed_over_per_row"] = round(out["bucketed_s"] / out["ivf_per_row_s"], 3)
    out["same_labels"] = float((bucketed[0] == per_row[0]).all(axis=1).mean())
    out["max_distance_difference"] = float(np.abs(bucketed[1] - per_row[1]).max())
    out["agrees_with_flat"] = float((bucketed[0][sample, 0] == exact[0][:, 0]).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
