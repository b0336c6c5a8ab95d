"""The whole pipeline on a head that runs nothing and three worker nodes
(`ray.cluster_utils.Cluster`), input and run directories on a real S3 server: a worker node lost
in the middle of embed, of cluster and of graph (three losses in one run) still ends, after
`mode: resume` where a stage failed, in a complete, duplicate-free run equal per image to a
single-node run of the same config. The work is in `multinode_pipeline.py` (its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.rayhead import kill_tree
from tests.s3server import upload_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LISTED, EMBEDDED, FAILED, PARTS = 75, 72, 3, 15  # the demo images, 5 per part
STAGES = ("embed", "cluster", "graph", "index")
TIMEOUT = 840  # under pytest's 900 s per test, which the first test's fixture counts against


@pytest.fixture(scope="module")
def report(s3_server, demo_images, tmp_path_factory) -> dict:
    """Run the script once (it takes minutes); its JSON report."""
    bucket = "t-multinode-pipeline"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    assert upload_folder(client, bucket, demo_images, "images") == 76  # with README.txt
    tmp = tmp_path_factory.mktemp("multinode-pipeline")
    report_path = tmp / "report.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RAY_ADDRESS", None)
    with open(tmp / "multinode.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("multinode_pipeline.py")),
                f"s3://{bucket}/images/",
                f"s3://{bucket}/runs",
                str(report_path),
            ],
            cwd=REPO,
            env=dict(env, PYTHONPATH=str(REPO)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        timed_out = False
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_tree(proc, grace=10)  # its Ray nodes too
    output = (tmp / "multinode.log").read_text(errors="replace")[-4000:]
    assert report_path.exists(), output
    result = json.loads(report_path.read_text())  # written after every stage
    print("\nmulti-node pipeline report:", json.dumps(result, default=str))
    assert not timed_out, f"the script ran past {TIMEOUT} s; its report so far: {result}"
    assert "error" not in result, result["error"] + output
    return result


def _attempts(report: dict, run: str, stage: str) -> list[dict]:
    return report["runs"][run][stage]["attempts"]


@pytest.mark.parametrize("run", ["single", "multi"])
def test_every_run_ends_complete_with_every_image_once(report, run):
    for stage in STAGES:
        assert _attempts(report, run, stage)[-1]["ok"], (stage, _attempts(report, run, stage))
    check = report["checks"][run]
    assert check["status"] == dict.fromkeys(STAGES, "done")
    assert (check["embedded"], check["failed"]) == (EMBEDDED, FAILED)
    assert check["repeats"] == dict.fromkeys(check["repeats"], 0), check["repeats"]
    assert check["assignments_cover_embeddings"] and check["knn_cover_embeddings"]
    assert check["index_covers_embeddings"] and check["index_count"] == EMBEDDED
    record = check["embed_record"]
    assert (record["listed"], record["embedded"], record["failed"]) == (LISTED, EMBEDDED, FAILED)
    assert record["stale_rows"] == 0 and record["driver_bytes_per_image"] < 100


def test_embeddings_reach_storage_from_the_workers_not_the_driver(report):
    """The driver received commit records only, never embeddings (1280 floats are 5 KB an
    image), in every embed attempt that ended, and the parts were processed once in all."""
    attempts = [a for a in _attempts(report, "multi", "embed") if a["ok"]]
    assert attempts and all(a["driver_bytes_per_image"] < 100 for a in attempts), attempts
    last = attempts[-1]
    assert last["parts_this_run"] >= 1
    assert last["already_committed"] + last["processed_this_run"] == LISTED
    if len(_attempts(report, "multi", "embed")) == 1:  # Ray Data recovered inside the run
        assert (last["parts_this_run"], last["processed_this_run"]) == (PARTS, LISTED)
    # The model actors ran on worker nodes (the head has no CPU), on more than one of them.
    seen = set(report["runs"]["multi"]["embed"]["actor_nodes"])
    assert len(seen) >= 2 and not seen & {report["head_node"]}, seen


@pytest.mark.parametrize("stage", ["embed", "cluster", "graph"])
def test_a_worker_node_was_lost_in_the_middle_of_the_stage(report, stage):
    kill = report["runs"]["multi"][stage].get("kill")
    assert kill is not None, report["runs"]["multi"][stage]
    assert kill["node"] in kill["actor_nodes_then"]  # it ran one of the stage's actors
    # Cluster and graph had committed a part; embed's model actor there was embedding (its
    # parts are committed later by separate write tasks, so there may be none yet).
    assert (0 if stage == "embed" else 1) <= kill["committed_before"] < PARTS, kill
    assert kill["node"] in report["removed_nodes"]
    attempts = _attempts(report, "multi", stage)
    assert len(attempts) <= 3 and attempts[-1]["ok"], attempts
    if stage == "cluster" and len(attempts) > 1:  # the resume kept the model and the parts
        assert 0 < attempts[-1]["assigned_this_run"] < EMBEDDED, attempts


# Processes every node has, and Ray Data's coordination actors, which it places on the driver's
# node on purpose: not pipeline work.
INFRASTRUCTURE = (
    "DashboardAgent",
    "RuntimeEnvAgent",
    "_StatsActor",
    "_AutoscalingCoordinatorActor",
    "ActorLocationTracker",
)


def _pipeline_tasks(report: dict, role: str) -> set[str]:
    return {t for t in report["node_tasks"][role] if not any(n in t for n in INFRASTRUCTURE)}


def test_every_model_actor_and_cpu_task_ran_on_the_workers(report):
    on_workers = {t.split(".")[0] for t in _pipeline_tasks(report, "worker")}
    for name in (
        "ray::MapWorker(MapBatches(EmbedActor))",
        "ray::ReadTodo->MapBatches(decode_stage)",  # each part's read fused with its decode
        "ray::MapBatches(commit_batch)",
        "ray::train_and_save",
        "ray::AssignActor",
        "ray::GraphSearcher",
        "ray::build_and_store",
    ):
        assert name in on_workers, (name, report["node_tasks"])


def test_the_head_runs_no_pipeline_task(report):
    """The head has no CPU, and every pipeline task claims some (the write tasks a token
    0.01): nothing is read, decoded, embedded or committed there."""
    assert _pipeline_tasks(report, "head") == set(), report["node_tasks"]


def test_results_equal_the_single_node_run(report):
    diff = report["compare"]
    assert diff["same_embedded_ids"] and diff["same_failures"], diff
    assert diff["embedding_max_abs_diff"] < 1e-4, diff
    # The same shards, so the same seeded k-means sample: the same centroids and assignments.
    assert diff["same_shard_layout"], diff
    assert diff["centroid_max_abs_diff"] < 1e-4, diff
    assert diff["same_assigned_ids"] and diff["assignment_mismatches"] == 0, diff
    assert diff["same_knn_ids"] and diff["knn_mismatches"] == 0, diff
    assert diff["same_index_ids"] and diff["index_vector_max_abs_diff"] < 1e-4, diff
