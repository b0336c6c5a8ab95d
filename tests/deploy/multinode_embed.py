"""The embed stage on several Ray nodes of one machine, one of them removed mid-run.

Run as a script (its own process, so that its Ray cluster is apart from any other Ray of the test
session); writes a JSON report:

    python tests/deploy/multinode_embed.py IMAGES_DIR RUN_DIR REPORT.json

A head with no CPU (so no task or actor can run on it) and two worker nodes carrying a custom
resource `gpu_node` stand in for a GPU cluster. Once the first part is committed and the model
actors run on both workers, one worker node is removed without warning and a fresh one joins (as
KubeRay or the autoscaler replace a lost node). If the stage fails, it is run again with
`mode: resume`, as a KubeRay retry would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

WORKER = {"num_cpus": 1, "resources": {"gpu_node": 1}, "object_store_memory": 150 * 2**20}


def _embed_actor_nodes() -> dict[str, str]:
    """actor id -> node id of the embedding actors alive now (from the GCS; no dashboard)."""
    from ray._private import state

    out = {}
    for actor_id, info in state.actors().items():
        if "EmbedActor" in info.get("ActorClassName", "") and info.get("State") == "ALIVE":
            out[actor_id] = info["Address"]["NodeID"]
    return out


def _config(images: str, run_dir: str) -> Any:
    from semclust.config import load_config

    return load_config(
        None,
        {
            "run_dir": run_dir,
            "embed.input": images,
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": "default",
            "embed.num_actors": 2,
            "embed.max_actors": 2,
            "embed.actor_num_cpus": 0.5,
            "embed.decode_num_cpus": 0.5,
            "embed.batch_size": 5,
            "embed.decode_batch_size": 5,
            "embed.rows_per_part": 5,
        },
    )


def _embed_with_a_retry(cfg: Any, report: dict, finished: threading.Event) -> None:
    """The stage, and once more (``mode: resume``) if it fails, as a KubeRay retry would."""
    from semclust import runner

    try:
        for _ in range(2):
            start = time.monotonic()
            try:
                record = runner.run_stages(cfg, ["embed"])["embed"]
                report["attempts"].append(
                    {"ok": True, "seconds": round(time.monotonic() - start, 1), **record}
                )
                return
            except Exception as exc:
                traceback.print_exc()
                report["attempts"].append(
                    {
                        "ok": False,
                        "seconds": round(time.monotonic() - start, 1),
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                    }
                )
    finally:
        finished.set()


def _remove_a_worker_midway(
    cluster: Any, workers: list, run_dir: str, finished: threading.Event, report: dict
) -> None:
    """Once a part is committed and model actors run on both workers, remove one worker node
    without warning and add a fresh one (as KubeRay or the autoscaler replace a lost node)."""
    from semclust import storage

    worker_ids = {w.node_id for w in workers}
    seen_nodes: set[str] = set()
    removed = False
    deadline = time.monotonic() + 600
    while not finished.is_set() and time.monotonic() < deadline:
        try:
            seen_nodes.update(_embed_actor_nodes().values())
            committed = len(storage.list_shards(storage.join(run_dir, "embeddings")))
        except Exception:  # the GCS or storage busy: look again
            committed = 0
        if not removed and committed >= 1 and worker_ids <= seen_nodes:
            victim = workers[1]
            report["removed_node"] = victim.node_id
            report["parts_committed_before_removal"] = committed
            cluster.remove_node(victim, allow_graceful=False)
            cluster.add_node(**WORKER)  # the replacement pod
            removed = True
        time.sleep(0.2)
    report["removed"] = removed
    report["actor_nodes_seen"] = sorted(seen_nodes)


def _count_rows(images: str, run_dir: str, report: dict) -> None:
    from semclust import storage
    from semclust.embed.sources import list_inputs
    from semclust.embed.writer import count_outputs

    listed = {storage.image_id_for(u) for u in list_inputs(images).uris}
    report["counts"] = {"listed": len(listed), **count_outputs(run_dir, listed)}
    uris = []
    for folder in ("embeddings", "failures"):
        for shard in storage.list_shards(storage.join(run_dir, folder)):
            uris += storage.read_parquet(shard, ["uri"])["uri"].to_pylist()
    report["rows"] = len(uris)
    report["distinct_uris"] = len(set(uris))


def main(images: str, run_dir: str, report_path: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    report: dict = {"attempts": []}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 2**28},
    )
    try:
        workers = [cluster.add_node(**WORKER) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        report["worker_nodes"] = sorted(w.node_id for w in workers)
        finished = threading.Event()
        # The stage runs in a thread: Ray only adds nodes from the main thread.
        stage = threading.Thread(
            target=_embed_with_a_retry,
            args=(_config(images, run_dir), report, finished),
            daemon=True,
        )
        stage.start()
        _remove_a_worker_midway(cluster, workers, run_dir, finished, report)
        stage.join(timeout=60)
        _count_rows(images, run_dir, report)
    finally:
        Path(report_path).write_text(json.dumps(report, indent=2, default=str))
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
