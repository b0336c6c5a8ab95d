"""Growing a run (``semclust add``) against what a user does without it: run cluster, graph and
index again on every row. One run on the same data (this machine is noisy: compare the ratio).

A seeded synthetic run directory of N rows (L2-normalised 256-d rows around 1,000 planted
centres, as benchmarks/scale_10m.py), of which the first N - A get cluster (k=1000), graph and
index through the CLI. Then A more rows from the same centres are written as new embeddings
parts (what the embed step of ``add`` writes; embedding itself costs the same either way and is
left out), and in a fresh process ``semclust.grow.stage.extend`` grows the run: assignment,
kNN edges, index. The baseline is ``semclust cluster``, ``graph`` and ``index`` with
``--mode overwrite`` on all N rows. Both graphs' recall@10 is measured on 1,000 seeded rows
(half of them added rows) against exact search; ``clusters_kept`` is the share of the first
rows whose cluster id the rebuild leaves unchanged (add keeps every one).

    python benchmarks/grow_add.py                         # N = 10^6, 1% added
    python benchmarks/grow_add.py --n 200000 --added 0.05 --work /tmp/grow   # smaller
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from faiss_scale import synthetic_labelled  # noqa: E402
from scale_10m import (  # noqa: E402
    DIM,
    INDEX_MEMORY,
    SHARD_ROWS,
    TreeMemory,
    exact_truth,
    read_rows,
    run_stage,
    semclust_graph_recall,
)

CLUSTER_K = 1000
RECALL_ROWS = 1000


def write_rows(run_dir: Path, x: np.ndarray, first_part: int, prefix: str) -> None:
    from tests.clustering.synthetic import write_run

    write_run(
        run_dir, x, rows_per_part=SHARD_ROWS, embedder=None, first_part=first_part, prefix=prefix
    )


def stage_flags(stage: str) -> list[str]:
    return {
        "cluster": ["--k", str(CLUSTER_K)],
        "graph": ["--set", "graph.duplicate_threshold=none"],
        "index": ["--index-memory", INDEX_MEMORY],
    }[stage]


def extend(run_dir: Path) -> dict[str, Any]:
    """``semclust add``'s steps after embedding, in a fresh process, timed, with its memory."""
    cmd = [sys.executable, __file__, "--extend-only", str(run_dir)]
    env = {**os.environ, "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    out_text, err = proc.communicate()
    result: dict[str, Any] = {
        "seconds": round(time.perf_counter() - start, 1),
        **memory.stop(),
        "exit": proc.returncode,
    }
    if proc.returncode != 0:
        result["error"] = err[-1500:]
    else:
        result["record"] = json.loads(out_text.strip().splitlines()[-1])
    return result


def extend_only(run_dir: str) -> None:
    """The child of ``extend``: the added parts are those without assignments."""
    from semclust import runinfo, storage
    from semclust.config import RunConfig, from_dict, replace
    from semclust.context import RunContext
    from semclust.grow.stage import _extend
    from semclust.rundir.embeddings import embedding_shards
    from semclust.rundir.layout import ASSIGNMENTS
    from semclust.rundir.tables import part_uri
    from semclust.runner import holding_run_dir

    recorded = runinfo.load(run_dir).get("config") or {}
    cfg = replace(from_dict({**RunConfig().to_dict(), **recorded}), run_dir=run_dir)
    shards = embedding_shards(run_dir)
    added = [u for u in shards.uris if not storage.exists(part_uri(run_dir, ASSIGNMENTS, u))]
    with holding_run_dir(run_dir, "grow_add benchmark", must_exist=True) as held:
        ctx = RunContext(cfg, command="grow_add", lock=held)
        record = _extend(ctx, shards, added)
    print(json.dumps(record, default=str))


def clusters(run_dir: Path) -> dict[int, int]:
    from semclust.rundir.tables import read_assignments

    table = read_assignments(str(run_dir))
    return dict(
        zip(
            table["image_id"].to_numpy().tolist(), table["cluster"].to_numpy().tolist(), strict=True
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows after the add")
    p.add_argument("--added", type=float, default=0.01, help="share of the rows added")
    p.add_argument("--work", default="/tmp/semclust-grow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--extend-only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.extend_only:
        extend_only(args.extend_only)
        return 0

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    x, _ = synthetic_labelled(args.n, DIM, args.seed)
    n_added = round(args.n * args.added)
    n_old = args.n - n_added
    old_parts = -(-n_old // SHARD_ROWS)
    write_rows(run, x[:n_old], 0, "old")
    from tests.clustering.synthetic import EMBEDDER

    from semclust import runinfo

    runinfo.update_stage(
        str(run),
        "embed",
        {"status": "done", "embedded": n_old, "dim": DIM, "embedder": EMBEDDER.__dict__},
        {},
    )
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "n": args.n,
        "added": n_added,
        "cluster_k": CLUSTER_K,
        "first_run": {},
        "rebuild": {},
    }
    for stage in ("cluster", "graph", "index"):
        figures["first_run"][stage] = run_stage(stage, run, stage_flags(stage), args.timeout)
        print(stage, figures["first_run"][stage]["seconds"], file=sys.stderr)
    before = clusters(run)
    write_rows(run, x[n_old:], old_parts, "new")
    figures["add"] = extend(run)
    print("add", figures["add"]["seconds"], file=sys.stderr)
    if figures["add"]["exit"] != 0:
        raise SystemExit(f"the add failed: {figures['add']['error']}")
    ids = read_rows(run)[0]
    rng = np.random.default_rng(args.seed)
    rows = np.sort(
        np.concatenate(
            [
                rng.choice(n_old, RECALL_ROWS // 2, replace=False),
                n_old + rng.choice(n_added, RECALL_ROWS // 2, replace=False),
            ]
        )
    )
    truth = exact_truth(x, rows)
    figures["add"]["graph_recall_at_10"] = round(semclust_graph_recall(run, ids, rows, truth), 5)
    after_add = clusters(run)
    figures["add"]["clusters_kept"] = round(
        float(np.mean([after_add[i] == c for i, c in before.items()])), 5
    )
    rebuilt = work / "rebuilt"
    shutil.copytree(run, rebuilt)
    for stage in ("cluster", "graph", "index"):
        flags = [*stage_flags(stage), "--mode", "overwrite"]
        figures["rebuild"][stage] = run_stage(stage, rebuilt, flags, args.timeout)
        print("rebuild", stage, figures["rebuild"][stage]["seconds"], file=sys.stderr)
    figures["rebuild"]["graph_recall_at_10"] = round(
        semclust_graph_recall(rebuilt, ids, rows, truth), 5
    )
    after = clusters(rebuilt)
    figures["rebuild"]["clusters_kept"] = round(
        float(np.mean([after[i] == c for i, c in before.items()])), 5
    )
    add_s = figures["add"]["seconds"]
    rebuild_s = sum(figures["rebuild"][s]["seconds"] for s in ("cluster", "graph", "index"))
    figures["rebuild_over_add"] = round(rebuild_s / add_s, 2) if add_s else None
    text = json.dumps(figures, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
