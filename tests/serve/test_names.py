"""Naming clusters through the service: names.yaml in the run directory, read by `semclust label
--names` to label every image of a named cluster; and the service on a run directory in S3."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from semclust.cli import main
from semclust.rundir.tables import read_assignments
from tests.serve.conftest import clusters_of
from tests.serve.server import Server

pytestmark = pytest.mark.slow


def test_names_given_in_the_service_label_the_run(run_copy, tmp_path, capsys):
    with Server(run_copy, tmp_path) as server:
        named = {2: "tabby cat", 5: "coffée ☕ <b>cup</b>"}
        for cluster, name in named.items():
            answer = server.post_json(f"/clusters/{cluster}/name", {"name": name}, method="PUT")
            assert answer.status == 200 and answer.json()["name"] == name
        # A name is changed, and one given and taken back.
        assert server.post_json("/clusters/2/name", {"name": "cat"}, method="PUT").status == 200
        named[2] = "cat"
        assert server.post_json("/clusters/7/name", {"name": "x"}, method="PUT").status == 200
        removed = server.request("DELETE", "/clusters/7/name").json()
        assert removed["name"] is None and removed["names"] == {str(c): n for c, n in named.items()}
        shown = {c["id"]: c["name"] for c in server.get("/clusters?limit=500").json()["clusters"]}
        assert {c: n for c, n in shown.items() if n} == named
        command = removed["label_command"]
    names_file = run_copy / "names.yaml"
    assert yaml.safe_load(names_file.read_text()) == named
    assert command == f"semclust label --run-dir {run_copy} --names {names_file}"

    # The command the service printed, as a user runs it.
    assert main(command.split()[1:]) == 0
    labels = pq.read_table(run_copy / "labels").to_pylist()
    table = read_assignments(str(run_copy))
    cluster_of = clusters_of(table)
    expected = {i: named[c] for i, c in cluster_of.items() if c in named}
    assert {r["image_id"]: r["label"] for r in labels if r["label"]} == expected
    assert {r["source"] for r in labels if r["label"]} == {"names"}

    # A service started now shows the labels and filters by them.
    with Server(run_copy, tmp_path) as server:
        health = server.get("/health").json()
        assert health["labels"] == 2
        some_id = next(iter(expected))
        hits = server.post_json("/search", {"image_id": some_id, "k": 50, "label": "cat"}).json()
        found = hits["results"][0]["hits"]
        assert found and {h["label"] for h in found} == {"cat"}
        assert len(found) == sum(1 for n in expected.values() if n == "cat")
        c2 = server.get("/clusters/2").json()
        assert c2["label"] == "cat" and c2["label_share"] == 1.0


def test_serving_a_run_directory_and_its_images_in_s3(
    serve_run, demo_images, s3_server, s3_bucket, tmp_path
):
    """The run directory and the images both in S3: the images' URIs of the local run are
    moved to s3:// (ids unchanged), so every image the service shows is read from the bucket."""
    import io

    import pyarrow as pa

    client = s3_server.client()
    local_root, s3_root = f"file://{demo_images}/", f"s3://{s3_bucket}/images/"
    for path in sorted(p for p in demo_images.rglob("*") if p.is_file()):
        key = f"images/{path.relative_to(demo_images)}"
        client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    for path in sorted(p for p in serve_run.rglob("*") if p.is_file()):
        if path.name == "run.lock":
            continue
        body = path.read_bytes()
        if path == serve_run / "index" / "ids.parquet":
            table = pq.read_table(path)
            moved = [u.replace(local_root, s3_root, 1) for u in table.column("uri").to_pylist()]
            column = table.schema.get_field_index("uri")
            table = table.set_column(column, "uri", pa.array(moved, table.schema.field("uri").type))
            buf = io.BytesIO()
            pq.write_table(table, buf)
            body = buf.getvalue()
        key = f"run/{path.relative_to(serve_run)}"
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    local_logs = tmp_path / "local"
    remote_logs = tmp_path / "s3"
    local_logs.mkdir()
    remote_logs.mkdir()
    with Server(serve_run, local_logs) as local, Server(f"s3://{s3_bucket}/run", remote_logs) as s3:
        health = s3.get("/health").json()
        assert health["run_dir"] == f"s3://{s3_bucket}/run" and health["images"] == 72
        ids = [m["image_id"] for m in local.get("/clusters/0?limit=3").json()["members"]]
        for image_id in ids:
            query = {"image_id": image_id, "k": 5}
            expected = local.post_json("/search", query).body.decode().replace(local_root, s3_root)
            assert s3.post_json("/search", query).json() == json.loads(expected)
            original = s3.get(f"/images/{image_id}")
            assert original.status == 200 and original.body == local.get(f"/images/{image_id}").body
            assert (
                s3.get(f"/images/{image_id}?size=32").body
                == local.get(f"/images/{image_id}?size=32").body
            )
        # An image gone from the bucket is a 404 with its URI, not a crash.
        gone = next(u for u in moved if u.endswith(".png"))
        client.delete_object(Bucket=s3_bucket, Key=gone.removeprefix(f"s3://{s3_bucket}/"))
        gone_id = table.column("image_id")[moved.index(gone)].as_py()
        missing = s3.get(f"/images/{gone_id}?size=48")
        assert missing.status == 404 and gone in missing.json()["error"]
        assert s3.get("/clusters").json() == local.get("/clusters").json()
        assert s3.post_json("/clusters/1/name", {"name": "in s3"}, method="PUT").status == 200
    stored = client.get_object(Bucket=s3_bucket, Key="run/names.yaml")["Body"].read()
    assert yaml.safe_load(stored) == {1: "in s3"}


def test_search_on_the_command_line_prints_no_tensorflow_noise(serve_run, demo_images):
    import subprocess
    import sys

    from tests.serve.server import TF_NOISE, quiet_env

    query = sorted((demo_images / "coins").iterdir())[0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "semclust.cli",
            "search",
            "--run-dir",
            str(serve_run),
            "--image",
            str(query),
            "-k",
            "3",
        ],
        capture_output=True,
        text=True,
        env=quiet_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"file://{query}" in done.stdout.splitlines()[2]
    noise = [line for line in done.stderr.splitlines() if any(m in line for m in TF_NOISE)]
    assert noise == [], noise
