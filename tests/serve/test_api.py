"""`semclust serve` over HTTP, against the real server process on 127.0.0.1: every query kind,
the filters, the cluster and image endpoints, and the error of every bad request."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semclust.demo import make_query_image
from semclust.rundir.embeddings import embedding_shards, read_embeddings
from semclust.rundir.tables import read_assignments, read_knn
from tests.serve.conftest import KNN_K, N_CLASSES, PER_CLASS, clusters_of
from tests.serve.server import TF_NOISE

pytestmark = pytest.mark.slow


def _exact(run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The run's image ids, unit embeddings and URIs, read from its embeddings shards."""
    import pyarrow.parquet as pq

    ids, vecs, uris = [], [], []
    for uri in embedding_shards(str(run)).uris:
        i, v = read_embeddings(uri)
        ids.append(i)
        vecs.append(v)
        uris += pq.read_table(uri.removeprefix("file://"), columns=["uri"]).column(0).to_pylist()
    x = np.concatenate(vecs)
    return np.concatenate(ids), x / np.linalg.norm(x, axis=1, keepdims=True), uris


def _class(uri: str) -> str:
    return uri.rsplit("/", 2)[-2]


def _hits(response) -> list[dict]:
    assert response.status == 200, response.body
    (result,) = response.json()["results"]
    return result["hits"]


def test_queries_by_id_vector_and_uri_are_exact_and_need_no_model(server, serve_run):
    ids, x, uris = _exact(serve_run)
    q = 7
    truth = ids[np.argsort(-(x @ x[q]), kind="stable")[:5]].tolist()
    by_id = _hits(server.post_json("/search", {"image_id": int(ids[q]), "k": 5}))
    assert [h["image_id"] for h in by_id] == truth
    assert by_id[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert by_id[0]["image_ref"] == str(ids[q]) and by_id[0]["uri"] == uris[q]
    # JavaScript sends the id as text (63-bit ids are not exact JavaScript numbers).
    assert _hits(server.post_json("/search", {"image_id": str(ids[q]), "k": 5})) == by_id
    by_vector = _hits(server.post_json("/search", {"vector": x[q].tolist(), "k": 5}))
    assert [h["image_id"] for h in by_vector] == truth
    by_uri = _hits(server.post_json("/search", {"uri": uris[q], "k": 5}))
    assert [h["image_id"] for h in by_uri] == truth
    # Batched: three queries in one request, each answered as on its own.
    batch = server.post_json(
        "/search", {"queries": [{"image_id": int(ids[i])} for i in (3, 7, 40)], "k": 5}
    ).json()["results"]
    assert [r["hits"][0]["image_id"] for r in batch] == [int(ids[i]) for i in (3, 7, 40)]
    assert batch[1]["hits"] == by_id
    assert server.get("/health").json()["model_loaded"] is False


def test_search_by_upload_finds_the_query_class_first(server, demo_images, tmp_path):
    fresh = make_query_image(tmp_path / "coffee-query.jpg", "coffee")
    hits = _hits(server.upload([(fresh.name, fresh.read_bytes())], k=5))
    assert [_class(h["uri"]) for h in hits[:3]] == ["coffee"] * 3, hits
    # An image of the set finds itself, then its own augmented siblings.
    own = sorted((demo_images / "chelsea").iterdir())[1]
    hits = _hits(server.upload([(own.name, own.read_bytes())], k=PER_CLASS))
    assert hits[0]["uri"] == f"file://{own}" and hits[0]["similarity"] > 0.999
    assert {_class(h["uri"]) for h in hits[:4]} == {"chelsea"}, hits
    assert hits[0]["cluster"] is not None
    # Two uploads in one request.
    two = server.upload([(fresh.name, fresh.read_bytes()), (own.name, own.read_bytes())], k=1)
    tops = [r["hits"][0]["uri"] for r in two.json()["results"]]
    assert _class(tops[0]) == "coffee" and tops[1] == f"file://{own}"
    assert server.get("/health").json()["model_loaded"] is True


def test_filters_search_only_their_cluster_exactly(server, serve_run):
    ids, x, _ = _exact(serve_run)
    table = read_assignments(str(serve_run))
    cluster_of = clusters_of(table)
    q = 11
    other = next(c for c in range(N_CLASSES) if c != cluster_of[int(ids[q])])
    members = np.array([cluster_of[int(i)] == other for i in ids])
    order = np.argsort(-(x[members] @ x[q]), kind="stable")
    truth = ids[members][order][:3].tolist()
    hits = _hits(server.post_json("/search", {"image_id": int(ids[q]), "k": 3, "cluster": other}))
    assert [h["image_id"] for h in hits] == truth
    assert {h["cluster"] for h in hits} == {other}
    # k larger than the cluster: all of its members, no more.
    hits = _hits(server.post_json("/search", {"image_id": int(ids[q]), "k": 50, "cluster": other}))
    assert len(hits) == int(members.sum())
    missing = server.post_json("/search", {"image_id": int(ids[q]), "label": "cat"})
    assert missing.status == 404 and "label 'cat'" in missing.json()["error"]


def test_clusters_are_paged_sorted_and_members_nearest_first(server, serve_run):
    full = server.get("/clusters?limit=500").json()
    assert full["total"] == N_CLASSES
    sizes = [c["size"] for c in full["clusters"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == N_CLASSES * PER_CLASS
    paged = []
    for offset in range(0, N_CLASSES, 5):
        paged += server.get(f"/clusters?offset={offset}&limit=5").json()["clusters"]
    assert paged == full["clusters"]
    by_cohesion = server.get("/clusters?sort=cohesion&order=asc&limit=500").json()["clusters"]
    cohesion = [c["cohesion"] for c in by_cohesion]
    assert cohesion == sorted(cohesion) and all(0 < v <= 1 for v in cohesion)

    table = read_assignments(str(serve_run))
    c = full["clusters"][0]["id"]
    mine = table.filter(np.asarray(table.column("cluster")) == c)
    one = server.get(f"/clusters/{c}?limit=500").json()
    assert one["size"] == mine.num_rows and len(one["members"]) == mine.num_rows
    assert {m["image_id"] for m in one["members"]} == set(mine.column("image_id").to_pylist())
    distances = [m["distance"] for m in one["members"]]
    assert distances == sorted(distances)
    pages = [server.get(f"/clusters/{c}?offset={o}&limit=2").json()["members"] for o in (0, 2, 4)]
    assert [m for p in pages for m in p] == one["members"][:6]
    assert full["clusters"][0]["preview"] == [m["image_ref"] for m in one["members"][:4]]


def test_images_thumbnails_and_neighbors(server, serve_run, demo_images):
    ids, _, uris = _exact(serve_run)
    jpg = next(i for i, u in enumerate(uris) if u.endswith(".jpg"))
    webp = next(i for i, u in enumerate(uris) if u.endswith(".webp"))
    original = server.get(f"/images/{ids[jpg]}")
    assert original.status == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.body == Path(uris[jpg].removeprefix("file://")).read_bytes()
    assert original.headers["x-content-type-options"] == "nosniff"
    assert server.get(f"/images/{ids[webp]}").headers["content-type"] == "image/webp"
    thumb = server.get(f"/images/{ids[webp]}?size=64")
    assert thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.body)) as im:
        assert im.format == "JPEG" and max(im.size) == 64

    graph_ids, neighbors, sims = read_knn(str(serve_run))
    row = 5
    answer = server.get(f"/images/{graph_ids[row]}/neighbors").json()
    assert answer["image"]["image_id"] == int(graph_ids[row])
    assert [n["image_id"] for n in answer["neighbors"]] == neighbors[row].tolist()
    assert len(answer["neighbors"]) == KNN_K
    assert [n["similarity"] for n in answer["neighbors"]] == pytest.approx(sims[row].tolist())
    assert len(server.get(f"/images/{graph_ids[row]}/neighbors?k=2").json()["neighbors"]) == 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/search", {"image_id": 12345, "k": 3}, 404, "image_id 12345 is not in this run"),
        ("POST", "/search", {"image_id": 1 << 70}, 404, "is not in this run"),
        ("POST", "/search", {"image_id": 1, "uri": "x"}, 400, "exactly one of"),
        ("POST", "/search", {"vector": [0.1, 0.2]}, 400, "needs 1280 numbers"),
        ("POST", "/search", {"vector": ["a"]}, 400, "vector must be a list of numbers"),
        ("POST", "/search", {"queries": []}, 400, "'queries' must be a list"),
        ("POST", "/search", {"image_id": 1, "k": 0}, 400, "k must be between 1 and 1000"),
        ("POST", "/search", {"image_id": 1, "k": 5000}, 400, "k must be between 1 and 1000"),
        ("POST", "/search", {"image_id": 1, "k": "ten"}, 400, "k must be an integer"),
        ("POST", "/search", {"uri": "file:///etc/hostname"}, 403, "neither an image of this run"),
        ("POST", "/search", {"uri": "/etc/passwd"}, 403, "neither an image of this run"),
        ("GET", "/images/12345", None, 404, "image_id 12345 is not in this run"),
        ("GET", "/images/abc", None, 422, "image_id"),
        ("GET", "/images/1?size=5000", None, 422, "size"),
        ("GET", "/images/..%2F..%2Fetc%2Fpasswd", None, 404, ""),
        ("GET", "/clusters/99", None, 404, "cluster 99 is not one of this run's clusters 0..11"),
        ("GET", "/clusters?limit=0", None, 422, "limit"),
        ("GET", "/clusters?sort=colour", None, 422, "sort"),
        ("GET", "/no-such-page", None, 404, "Not Found"),
        ("PUT", "/clusters/99/name", {"name": "x"}, 404, "cluster 99"),
        ("PUT", "/clusters/1/name", {"name": "  "}, 400, "must not be empty"),
        ("PUT", "/clusters/1/name", {"name": "unknown"}, 400, "reserved"),
        ("PUT", "/clusters/1/name", {"name": "a\nb"}, 400, "one line"),
        ("PUT", "/clusters/1/name", {}, 422, "name"),
    ],
)
def test_every_bad_request_gets_a_json_error(server, method, path, body, status, message):
    if body is None:
        response = server.request(method, path)
    else:
        response = server.post_json(path, body, method=method)
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    assert message in response.json()["error"]


def test_bad_uploads_and_bodies(server, demo_images):
    text = server.upload([("notes.png", b"this is text, not a PNG")])
    assert text.status == 400 and "upload 'notes.png' is not an image" in text.json()["error"]
    assert "is empty" in server.upload([("empty.jpg", b"")]).json()["error"]
    truncated = (demo_images / "_unusable" / "truncated.jpg").read_bytes()
    assert server.upload([("cut.jpg", truncated)]).status == 400
    big = server.upload([("big.jpg", b"\xff" * (3 << 20))])
    assert big.status == 413 and "limit of 2 MiB" in big.json()["error"]
    bad_json = server.request("POST", "/search", b"{not json", {"Content-Type": "application/json"})
    assert bad_json.status == 400 and "not valid JSON" in bad_json.json()["error"]
    plain = server.request("POST", "/search", b"hello", {"Content-Type": "text/plain"})
    assert plain.status == 400 and "multipart/form-data" in plain.json()["error"]
    # A folder inside the run's sources that is no image, and a path that climbs out of them.
    inside = server.post_json("/search", {"uri": f"file://{demo_images}/_unusable/empty.jpg"})
    assert inside.status == 400 and "is not an image" in inside.json()["error"]
    climb = server.post_json("/search", {"uri": f"file://{demo_images}/../../../etc/passwd"})
    assert climb.status == 403


def test_an_oversized_body_is_read_before_the_413(server):
    # A client that writes its whole body before reading (urllib, requests) would see its
    # connection reset if the server answered and closed after the first bytes.
    host, port = server.url.removeprefix("http://").split(":")
    body = b"\xff" * (3 << 20)
    head = f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[: 1 << 20])
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing is answered while the body is still coming
        sock.settimeout(30)
        sock.sendall(body[1 << 20 :])
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:  # closed without an answer: the assertion below says so
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_schema_page_and_quiet_start(server, demo_images):
    schema = server.get("/openapi.json").json()
    for path in (
        "/search",
        "/clusters",
        "/clusters/{cluster_id}",
        "/clusters/{cluster_id}/name",
        "/images/{image_id}",
        "/images/{image_id}/neighbors",
        "/health",
    ):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert server.get("/docs").status == 200
    page = server.get("/")
    assert page.status == 200 and b'id="query-file"' in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # The model is loaded (TensorFlow started) by now, and said nothing on the terminal.
    own = sorted((demo_images / "coffee").iterdir())[0]
    assert server.upload([(own.name, own.read_bytes())], k=1).status == 200
    noise = [line for line in server.stderr().splitlines() if any(m in line for m in TF_NOISE)]
    assert noise == [], noise
