"""The whole pipeline (embed, cluster, graph, index) on several Ray nodes of one machine, losing a
worker node in the middle of embed, of cluster and of graph, against a single-node run.

Run as a script (its own process, so that its Ray clusters are apart from any other Ray of the
test session); writes a JSON report:

    python tests/deploy/multinode_pipeline.py IMAGES_URI RUNS_URI REPORT.json

``RUNS_URI`` (an s3:// prefix) receives two run directories made with one config:

- ``single``: a Ray of one node (3 CPUs) that semclust starts itself: the reference;
- ``multi``: a head that runs nothing (``num_cpus=0``) and three worker nodes; one worker node is
  removed without warning in the middle of embed, again in the middle of cluster and again in
  the middle of graph (three losses in one run: each stage reads only the embeddings, so each
  loss is checked on its own stage's output, and the model is started three times, not five).

"In the middle": the stage has committed at least one part (``embeddings/``, ``assignments/``,
``knn/``) and one of its actors is alive on the node removed. A fresh node joins after each
removal, as KubeRay replaces a lost pod; a stage that failed is run again with ``mode: resume``,
as a KubeRay retry would, and its attempts are counted. The script reports what happened and how
the runs compare (per image id); the test asserts.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("embed", "cluster", "graph", "index")
ACTOR_CLASS = {"embed": "EmbedActor", "cluster": "AssignActor", "graph": "GraphSearcher"}
OUTPUT = {"embed": "embeddings", "cluster": "assignments", "graph": "knn"}
MAX_ATTEMPTS = 3  # a KubeRay job's backoffLimit-style budget per stage
# What each attempt's report keeps of the stage's record (those the stage has).
RECORD_KEYS = ("parts_this_run", "already_committed", "processed_this_run", "rows")
RECORD_KEYS += ("driver_bytes_per_image", "assigned_this_run")
WORKER = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
HEAD = {
    "num_cpus": 0,
    "include_dashboard": False,
    "object_store_memory": 2**28,
    # A killed node is declared dead after 3 failed checks a second apart (Ray's default: 5, 3 s
    # apart); each check still waits Ray's default timeout, so a live node slowed by the busy
    # 2-core machine is not declared dead.
    "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
}


def config(images: str, run_dir: str) -> Any:
    """One config for every run: exact methods, a fixed k, seeded; small parts so that every
    stage works through many of them."""
    from semclust.config import load_config

    return load_config(
        None,
        {
            "run_dir": run_dir,
            "mode": "resume",
            "ray.num_cpus": 3,  # the single-node run: as many CPUs as the three workers
            "ray.object_store_memory": "400MB",
            "embed.input": images,
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": "default",
            "embed.num_actors": 2,
            "embed.max_actors": 2,
            "embed.actor_num_cpus": 0.5,
            "embed.decode_num_cpus": 0.5,
            "embed.batch_size": 5,
            "embed.rows_per_part": 5,
            "cluster.k": 12,
            "cluster.seed": 7,
            "cluster.actor_num_cpus": 1,
            "cluster.train_num_cpus": 1,  # the same FAISS threads on one node as on three
            "graph.method": "exact",
            "graph.k": 5,
            "graph.num_actors": 3,
            "graph.actor_num_cpus": 1,
            "index.type": "flat",
            "index.num_cpus": 1,
        },
    )


# --- where things run -------------------------------------------------------------------------


def stage_actor_nodes(stage: str) -> dict[str, str]:
    """actor id -> node id of the stage's actors alive now (from the GCS; no dashboard)."""
    from ray._private import state

    name = ACTOR_CLASS.get(stage)
    out = {}
    for actor_id, info in state.actors().items():
        if name and name in info.get("ActorClassName", "") and info.get("State") == "ALIVE":
            out[actor_id] = info["Address"]["NodeID"]
    return out


class TaskSampler(threading.Thread):
    """Samples, from /proc, ten times a second, the Ray worker processes of each node and the
    task or actor each runs (Ray titles a busy worker ``ray::<task>``): how many samples saw each
    title, per role (what ran on the head?), and the titles ever seen per node id (is the model
    actor on a node already embedding?)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.raylets: dict[int, tuple[str, str]] = {}  # raylet pid -> (role, node id)
        self.seen: dict[str, Counter[str]] = {"head": Counter(), "worker": Counter()}
        self.by_node: dict[str, set[str]] = {}
        self.lock = threading.Lock()  # the main thread reads what this one adds
        self.stop = threading.Event()

    def watch(self, node: Any, role: str | None) -> None:
        """Sample ``node``'s workers as ``role`` ("head", "worker"); None: no longer."""
        import ray._private.ray_constants as rc

        pid = node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid
        if role is None:
            self.raylets.pop(pid, None)  # a removed node: its pid may be reused
        else:
            self.raylets[pid] = (role, node.node_id)

    def run(self) -> None:
        # Often: a model call on 5 images (the title ``...submit``) lasts a fraction of a second.
        while not self.stop.wait(0.1):
            for raylet, (role, node_id) in list(self.raylets.items()):
                for child in _children(raylet):
                    try:
                        title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
                    except OSError:  # ended meanwhile
                        continue
                    name = title.decode(errors="replace").split(" ")[0][:80]
                    if name.startswith("ray::") and name != "ray::IDLE":
                        with self.lock:
                            self.seen[role][name] += 1
                            self.by_node.setdefault(node_id, set()).add(name)

    def nodes_that_ran(self, suffix: str) -> set[str]:
        """The node ids where a worker was seen running a title ending with ``suffix``."""
        with self.lock:
            return {
                n for n, titles in self.by_node.items() if any(t.endswith(suffix) for t in titles)
            }

    def counts(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {role: dict(seen) for role, seen in self.seen.items()}


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``'s main thread (the raylet starts its workers from it)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # the process (a removed node's raylet) is gone
        return []


class Fleet:
    """The multi-node cluster: a head that runs nothing and the worker nodes alive now."""

    def __init__(self, sampler: TaskSampler) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args=HEAD)
        self.sampler = sampler
        sampler.watch(self.cluster.head_node, "head")
        self.workers = [self._add() for _ in range(3)]
        self.cluster.wait_for_nodes()
        self.removed: list[str] = []

    def _add(self) -> Any:
        node = self.cluster.add_node(**WORKER)
        self.sampler.watch(node, "worker")
        return node

    def replace(self, node_id: str) -> None:
        """Remove a worker node without warning and add a fresh one (the replacement pod)."""
        victim = next(w for w in self.workers if w.node_id == node_id)
        self.sampler.watch(victim, None)
        self.cluster.remove_node(victim, allow_graceful=False)
        self.workers.remove(victim)
        self.removed.append(node_id)
        self.workers.append(self._add())


# --- running a stage ---------------------------------------------------------------------------


def _attempts(cfg: Any, stage: str, out: dict, finished: threading.Event) -> None:
    """The stage, then again (``mode: resume``) after each failure, up to ``MAX_ATTEMPTS``."""
    from semclust import runner

    try:
        for _ in range(MAX_ATTEMPTS):
            start = time.monotonic()
            try:
                record = runner.run_stages(cfg, [stage])[stage]
            except Exception as exc:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"[:1500]
                out["attempts"].append(
                    {"ok": False, "seconds": round(time.monotonic() - start, 1), "error": error}
                )
                continue
            counts = {key: record[key] for key in RECORD_KEYS if key in record}
            out["attempts"].append(
                {"ok": True, "seconds": round(time.monotonic() - start, 1), **counts}
            )
            out["record"] = {key: value for key, value in record.items() if key != "settings"}
            return
    finally:
        finished.set()


def run_stage(fleet: Fleet | None, cfg: Any, stage: str, kill: bool) -> dict[str, Any]:
    """Run ``stage`` (with its resumes) in a thread; with ``kill``, remove one worker node in
    its middle from this (the main) thread, the only one Ray lets add nodes."""
    out: dict[str, Any] = {"attempts": []}
    finished = threading.Event()
    if fleet is None:  # one node, nothing to remove: in this thread, where Ray starts cleanly
        _attempts(cfg, stage, out, finished)
        return out
    worker = threading.Thread(target=_attempts, args=(cfg, stage, out, finished), daemon=True)
    worker.start()
    nodes = _watch(fleet, cfg.run_dir, stage, finished, out if kill else None)
    worker.join()
    out["actor_nodes"] = sorted(nodes)
    return out


def _watch(fleet: Fleet, run_dir: str, stage: str, finished: threading.Event, out: dict | None):
    """Poll the stage's actors and committed parts until it ends; with ``out``, remove a node in
    the middle of the stage (``_victims``) and say so in ``out["kill"]``. The nodes that hosted
    the stage's actors."""
    from semclust import storage

    seen: set[str] = set()
    folder = storage.join(run_dir, OUTPUT.get(stage, "index"))
    # Cluster and graph work through their parts in a second or two: look often.
    while not finished.wait(0.25 if stage == "embed" else 0.05):
        try:
            hosts = set(stage_actor_nodes(stage).values())
            committed = len(storage.list_shards(folder)) if out is not None else 0
        except Exception:  # the GCS or the store busy: look again
            continue
        seen |= hosts
        victims = _victims(fleet, stage, hosts, committed)
        if out is not None and "kill" not in out and victims:
            out["kill"] = {
                "node": victims[0],
                "committed_before": committed,
                "actor_nodes_then": sorted(hosts),
            }
            fleet.replace(victims[0])
    return seen


def _victims(fleet: Fleet, stage: str, hosts: set[str], committed: int) -> list[str]:
    """Worker nodes whose loss now falls in the middle of the stage: cluster and graph, once a
    part is committed, the nodes running their actors; embed, the nodes whose model actor has
    started embedding (its parts are committed only later, by separate write tasks)."""
    workers = {w.node_id for w in fleet.workers}
    if stage == "embed":
        working = fleet.sampler.nodes_that_ran("(EmbedActor)).submit")
        return sorted(hosts & workers & working)
    return sorted(hosts & workers) if committed >= 1 else []


# --- reading and comparing runs ----------------------------------------------------------------


def _rows(run_dir: str, folder: str, columns: list[str]) -> list[list[dict]]:
    """The rows (as dicts) of each of a folder's parts, in part order."""
    from semclust import storage

    shards = storage.list_shards(storage.join(run_dir, folder))
    return [storage.read_parquet(s, columns).to_pylist() for s in shards]


def read_run(run_dir: str) -> dict[str, Any]:
    """A run's outputs keyed by image id, and how many rows repeat an id (or a URI)."""
    import faiss

    from semclust import storage
    from semclust.clustering.model import KMeansModel

    out: dict[str, Any] = {"repeats": {}}

    def keyed(rows: list[dict], key: str, name: str) -> dict:
        out["repeats"][name] = len(rows) - len({r[key] for r in rows})
        return {r[key]: r for r in rows}

    parts = _rows(run_dir, "embeddings", ["image_id", "uri", "embedding"])
    out["shards"] = [sorted(r["image_id"] for r in part) for part in parts]
    emb = [r for part in parts for r in part]
    out["embeddings"] = {
        i: np.asarray(r["embedding"]) for i, r in keyed(emb, "image_id", "embeddings").items()
    }
    out["uris"] = {r["image_id"]: r["uri"] for r in emb}
    fail = [r for part in _rows(run_dir, "failures", ["uri"]) for r in part]
    out["failures"] = set(keyed(fail, "uri", "failures"))
    out["repeats"]["embedded_and_failed"] = len(out["failures"] & set(out["uris"].values()))
    assign = [r for part in _rows(run_dir, "assignments", ["image_id", "cluster"]) for r in part]
    out["assignments"] = {
        i: r["cluster"] for i, r in keyed(assign, "image_id", "assignments").items()
    }
    knn = [r for p in _rows(run_dir, "knn", ["image_id", "neighbors", "similarities"]) for r in p]
    out["knn"] = {
        i: (r["neighbors"], r["similarities"]) for i, r in keyed(knn, "image_id", "knn").items()
    }
    ids = storage.read_parquet(storage.join(run_dir, "index", "ids.parquet"), ["image_id"])
    index = faiss.deserialize_index(
        np.frombuffer(storage.read_bytes(storage.join(run_dir, "index", "index.faiss")), np.uint8)
    )
    index_ids = ids["image_id"].to_pylist()
    out["repeats"]["index"] = len(index_ids) - len(set(index_ids))
    out["index"] = dict(zip(index_ids, index.reconstruct_n(0, index.ntotal), strict=True))
    out["index_meta"] = storage.read_json(storage.join(run_dir, "index", "meta.json"))
    out["centroids"] = KMeansModel.load(run_dir)[0].centroids
    out["run_json"] = storage.read_json(storage.join(run_dir, "run.json"))
    return out


def _knn_differences(run: dict, ref: dict) -> tuple[int, int]:
    """(rows whose neighbour lists differ, of those, rows that differ only among neighbours of
    equal similarity within 1e-5: a tie broken another way, not a wrong answer)."""
    differ = ties = 0
    for image_id, (neighbors, sims) in ref["knn"].items():
        got, got_sims = run["knn"].get(image_id, (None, None))
        if got == neighbors:
            continue
        differ += 1
        if got is not None and np.allclose(got_sims, sims, atol=1e-5):
            ties += 1
    return differ, ties


def compare(run: dict, ref: dict) -> dict[str, Any]:
    """How a run's outputs differ from the reference's, per image id."""
    same_ids = set(run["embeddings"]) == set(ref["embeddings"])
    common = set(run["embeddings"]) & set(ref["embeddings"])
    diff = max(float(np.abs(run["embeddings"][i] - ref["embeddings"][i]).max()) for i in common)
    index_diff = max(
        float(np.abs(run["index"][i] - ref["index"][i]).max())
        for i in set(run["index"]) & set(ref["index"])
    )
    knn_differ, knn_ties = _knn_differences(run, ref)
    return {
        "same_embedded_ids": same_ids,
        "same_failures": run["failures"] == ref["failures"],
        "embedding_max_abs_diff": diff,
        "same_shard_layout": run["shards"] == ref["shards"],
        "centroid_max_abs_diff": float(np.abs(run["centroids"] - ref["centroids"]).max()),
        "same_assigned_ids": set(run["assignments"]) == set(ref["assignments"]),
        "assignment_mismatches": sum(
            run["assignments"].get(i) != c for i, c in ref["assignments"].items()
        ),
        "same_knn_ids": set(run["knn"]) == set(ref["knn"]),
        "knn_mismatches": knn_differ,
        "knn_tie_mismatches": knn_ties,
        "same_index_ids": set(run["index"]) == set(ref["index"]),
        "index_vector_max_abs_diff": index_diff,
    }


def check(run: dict) -> dict[str, Any]:
    """A run's completeness: counts, repeats, every stage covering every embedded image."""
    stages = run["run_json"].get("stages", {})
    embedded = set(run["embeddings"])
    return {
        "embedded": len(embedded),
        "failed": len(run["failures"]),
        "repeats": run["repeats"],
        "assignments_cover_embeddings": set(run["assignments"]) == embedded,
        "knn_cover_embeddings": set(run["knn"]) == embedded,
        "index_covers_embeddings": set(run["index"]) == embedded,
        "index_count": run["index_meta"].get("count"),
        "status": {name: stages.get(name, {}).get("status") for name in STAGES},
        "embed_record": {
            key: stages.get("embed", {}).get(key)
            for key in ("listed", "embedded", "failed", "stale_rows", "driver_bytes_per_image")
        },
    }


# --- the script --------------------------------------------------------------------------------


def pipeline(fleet: Fleet | None, cfg: Any, kill_in: tuple[str, ...], out: dict, save: Any) -> None:
    """Every stage in order into ``out``, each to its end (with resumes); one node lost in each
    stage of ``kill_in``. ``save()`` after each stage: a run stopped by the test's timeout still
    says how far it got."""
    for stage in STAGES:
        start = time.monotonic()
        out[stage] = run_stage(fleet, cfg, stage, kill=stage in kill_in)
        out[stage]["seconds"] = round(time.monotonic() - start, 1)
        save()
        if not out[stage]["attempts"][-1]["ok"]:
            break


def main(images: str, runs: str, report_path: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    report: dict[str, Any] = {"runs": {}, "seconds": {}}
    fleet: Fleet | None = None
    sampler = TaskSampler()
    sampler.start()
    started = time.monotonic()

    def save() -> None:
        report["seconds"]["so_far"] = round(time.monotonic() - started, 1)
        report["node_tasks"] = sampler.counts()
        Path(report_path).write_text(json.dumps(report, indent=2, default=str))

    try:
        # The reference: semclust starts a Ray of one node itself (ray.num_cpus of the config).
        report["runs"] = {"single": {}, "multi": {}}
        pipeline(None, config(images, f"{runs}/single"), (), report["runs"]["single"], save)
        ray.shutdown()
        report["seconds"]["single"] = round(time.monotonic() - started, 1)
        fleet = Fleet(sampler)
        ray.init(address=fleet.cluster.address, log_to_driver=False)
        report["head_node"] = fleet.cluster.head_node.node_id
        report["worker_nodes"] = [w.node_id for w in fleet.workers]
        report["removed_nodes"] = fleet.removed  # the same list: filled as nodes are removed
        report["seconds"]["cluster_up"] = round(time.monotonic() - started, 1)
        kill_in = ("embed", "cluster", "graph")
        pipeline(fleet, config(images, f"{runs}/multi"), kill_in, report["runs"]["multi"], save)
        report["seconds"]["multi"] = round(time.monotonic() - started, 1)
        ref, run = read_run(f"{runs}/single"), read_run(f"{runs}/multi")
        report["checks"] = {"single": check(ref), "multi": check(run)}
        report["compare"] = compare(run, ref)
    except Exception:
        report["error"] = traceback.format_exc()[-3000:]
    finally:
        sampler.stop.set()
        report["seconds"]["total"] = round(time.monotonic() - started, 1)
        save()
        try:
            ray.shutdown()
        finally:
            if fleet is not None:
                fleet.cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
