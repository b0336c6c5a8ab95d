"""Video as input: real H.264/mp4 and VP9/webm files written here with PyAV, listed as one row per
sampled frame, decoded by seeking, embedded from a folder and from the S3 server; broken videos
become failure rows and a video that breaks halfway keeps the frames before the break."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semclust import runner, storage
from semclust.config import load_config
from semclust.embed.sources import InputStream
from semclust.embed.video import (
    Sampling,
    decode_video_rows,
    has_video_extension,
    probe,
    sniff_video_format,
)
from semclust.rundir.frames import UNREADABLE_VIDEO, clock, frame_id, frame_label, row_id
from tests.embed.videos import SCENES, scene_pictures, write_video
from tests.s3server import upload_folder

SECONDS_PER_SCENE = 4
DURATION = SECONDS_PER_SCENE * len(SCENES)  # 12 s


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return scene_pictures()


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, pictures) -> Path:
    """Two good videos (H.264 mp4, VP9 webm) of the three scenes, an H.264 video without an
    extension (found by content), a still photo, and three broken videos: junk bytes named .mp4,
    an mp4 cut at 40 % with its index at the end (cannot be opened), and a webm cut at 60 %
    (opens, breaks halfway)."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "talk.mp4", pictures, seconds_per_scene=SECONDS_PER_SCENE)
    write_video(root / "lecture.webm", pictures, codec="libvpx-vp9")
    write_video(root / "scratch.mp4", pictures, faststart=True)
    shutil.copy(root / "scratch.mp4", root / "camera-feed")  # no extension
    (root / "scratch.mp4").unlink()
    (root / "junk.mp4").write_bytes(b"this is not a video\n" * 50)
    full = write_video(root / "cut.tmp.mp4", pictures).read_bytes()
    (root / "cut.mp4").write_bytes(full[: len(full) * 2 // 5])
    (root / "cut.tmp.mp4").unlink()
    webm = write_video(root / "half.tmp.webm", pictures, codec="libvpx-vp9").read_bytes()
    (root / "half.webm").write_bytes(webm[: len(webm) * 3 // 5])
    (root / "half.tmp.webm").unlink()

    Image.fromarray(pictures[1]).save(root / "still.jpg", quality=90)
    (root / "notes.txt").write_text("not media\n")
    return root


def test_sampling_times():
    assert Sampling(30, 500).times(95.0) == [0.0, 30.0, 60.0, 90.0]
    assert Sampling(30, 500).times(90.0) == [0.0, 30.0, 60.0]  # 90 s is the end, not a frame
    assert Sampling(30, 500).times(0.0) == [0.0]  # always the first frame
    assert Sampling(2.5, 500).times(6.0) == [0.0, 2.5, 5.0]
    # Longer than interval x max_frames: max_frames spread over the whole video.
    spread = Sampling(30, 4).times(36_000.0)
    assert spread == [0.0, 9000.0, 18000.0, 27000.0]


def test_frame_ids_labels_and_detection():
    uri = "s3://b/v.mp4"
    assert frame_id(uri, 30.0) == frame_id(uri, np.float32(30.0)) == row_id(uri, 30.0)
    assert frame_id(uri, 30.0) != frame_id(uri, 30.001) != storage.image_id_for(uri)
    assert row_id(uri, None) == row_id(uri, math.nan) == row_id(uri, UNREADABLE_VIDEO)
    assert row_id(uri, None) == storage.image_id_for(uri)
    assert clock(75.25) == "1:15.2" and clock(3725.0) == "1:02:05.0" and clock(0) == "0:00.0"
    assert frame_label(uri, 75.0) == "s3://b/v.mp4 @ 1:15.0" and frame_label(uri, None) == uri
    assert has_video_extension("a/B.MKV") and not has_video_extension("a/b.ts")
    assert sniff_video_format(b"\x1a\x45\xdf\xa3" + b"\x00" * 60) == "matroska"
    assert sniff_video_format(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40
    assert sniff_video_format(heic) is None  # an image in an ISO-BMFF box
    assert sniff_video_format(b"\xff\xd8\xff\xe0" + b"\x00" * 60) is None


def _nearest_scene(frame: np.ndarray, pictures: list[np.ndarray]) -> tuple[int, float]:

    size = frame.shape[0]
    errors = [
        float(
            np.abs(
                np.asarray(Image.fromarray(p).resize((size, size))).astype(int) - frame.astype(int)
            ).mean()
        )
        for p in pictures
    ]
    return int(np.argmin(errors)), min(errors)


@pytest.mark.parametrize("name", ["talk.mp4", "lecture.webm"])
def test_probe_and_decode_by_seeking(video_folder, pictures, name):
    path = str(video_folder / name)
    info = probe(path)
    assert abs(info.duration - DURATION) < 0.3 and (info.width, info.height) == (128, 96)
    times = [11.0, 0.0, 5.0, 4.0, 8.6, 1.0]  # out of order: decoded in time order, kept in place
    results = decode_video_rows(path, -1, -1, times, 64, "squash", 10**8)
    for t, r in zip(times, results, strict=True):
        assert r.error == "" and (r.width, r.height) == (128, 96), (t, r.error)
        scene, err = _nearest_scene(r.pixels, pictures)
        assert scene == int(t // SECONDS_PER_SCENE) and err < 12, (t, scene, err)
    late = decode_video_rows(path, -1, -1, [DURATION + 5.0], 64, "squash", 10**8)
    assert late[0].error.startswith("video ends early or is broken: no frame at 17.000 s")


def test_listing_expands_videos_into_frames(video_folder):
    stream = InputStream(str(video_folder), page_size=3, sampling=Sampling(2.0, 500))
    table = pa_concat(list(stream.pages()))
    rows = {}
    for uri, t, i, image_id in zip(
        *(table.column(c).to_pylist() for c in ("uri", "frame_time", "frame_index", "image_id")),
        strict=True,
    ):
        rows.setdefault(uri.rsplit("/", 1)[1], []).append((t, i, image_id, uri))
    times = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    for name in ("talk.mp4", "lecture.webm", "camera-feed"):
        assert [t for t, *_ in rows[name]] == times, name
        assert [i for _, i, *_ in rows[name]] == list(range(6))
        assert [r[2] for r in rows[name]] == [frame_id(r[3], r[0]) for r in rows[name]]
    assert math.isnan(rows["still.jpg"][0][0]) and rows["still.jpg"][0][1] == -1
    assert [(t, i) for t, i, *_ in rows["junk.mp4"]] == [(UNREADABLE_VIDEO, -1)]
    assert [(t, i) for t, i, *_ in rows["cut.mp4"]] == [(UNREADABLE_VIDEO, -1)]
    assert len(rows["half.webm"]) == 6  # its header states the whole duration
    assert set(rows) == {
        "talk.mp4",
        "lecture.webm",
        "camera-feed",
        "still.jpg",
        "junk.mp4",
        "cut.mp4",
        "half.webm",
    }
    assert (stream.videos, stream.video_frames, stream.videos_unreadable) == (6, 24, 2)
    assert stream.skipped == 1  # notes.txt
    # Without sampling (reference images, queries) videos are not images.
    plain = InputStream(str(video_folder))
    names = {u.rsplit("/", 1)[1] for p in plain.pages() for u in p.column("uri").to_pylist()}
    assert names == {"still.jpg"}


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def _cfg(input_uri: str, run_dir: str, **extra):
    overrides = {
        "run_dir": run_dir,
        "embed.input": input_uri,
        "embed.backbone": "efficientnet_lite0",
        "embed.weights": "default",
        "embed.image_size": 96,
        "embed.rows_per_part": 7,  # a video's frames span parts
        "embed.batch_size": 8,
        "embed.frame_interval": 2.0,
    }
    overrides.update(extra)
    return load_config(None, overrides)


def _frames_of(run_dir: str) -> tuple[dict[tuple[str, float | None], tuple[int, np.ndarray]], dict]:
    embedded = {}
    for shard in storage.list_shards(storage.join(run_dir, "embeddings")):
        t = storage.read_parquet(shard)
        vecs = t["embedding"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        for uri, ft, fi, image_id, v in zip(
            t["uri"].to_pylist(),
            t["frame_time"].to_pylist(),
            t["frame_index"].to_pylist(),
            t["image_id"].to_pylist(),
            vecs,
            strict=True,
        ):
            key = (uri.rsplit("/", 1)[1], ft)
            assert key not in embedded, f"{key} embedded twice"
            assert image_id == row_id(uri, ft) and (fi is None) == (ft is None)
            embedded[key] = (fi, v)
    failed = {}
    for shard in storage.list_shards(storage.join(run_dir, "failures")):
        t = storage.read_parquet(shard).to_pylist()
        for r in t:
            failed[(r["uri"].rsplit("/", 1)[1], r["frame_time"])] = (r["stage"], r["error"])
    return embedded, failed


def _check_run(run_dir: str, record: dict) -> None:
    embedded, failed = _frames_of(run_dir)
    assert record["listed"] == record["embedded"] + record["failed"] == len(embedded) + len(failed)
    videos = record["videos"]
    assert videos["listed"] == 6 and videos["unreadable"] == 2
    assert videos["frames_listed"] == videos["frames_embedded"] + videos["frames_failed"] == 24
    assert ("still.jpg", None) in embedded
    for name in ("talk.mp4", "lecture.webm", "camera-feed"):
        assert sorted(t for n, t in embedded if n == name) == [0, 2, 4, 6, 8, 10], name
    assert failed[("junk.mp4", None)][1].startswith("cannot open video")
    assert failed[("cut.mp4", None)][1].startswith("cannot open video")
    half_ok = sorted(t for n, t in embedded if n == "half.webm")
    half_bad = sorted(t for n, t in failed if n == "half.webm")
    # The frames before the break are kept, every one from it on is a failure row.
    assert half_ok and half_bad and half_ok + half_bad == [0, 2, 4, 6, 8, 10]
    assert max(half_ok) < min(half_bad) and half_ok[-1] >= 4
    assert all(failed[("half.webm", t)][1].startswith("video ends early") for t in half_bad)
    # Frames of one scene cluster together: every frame's nearest other frame (cosine) shows the
    # same scene, across codecs and videos.
    keys = [k for k in embedded if k[1] is not None]
    vecs = np.stack([embedded[k][1] for k in keys])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -2)
    scene = np.array([int(t // SECONDS_PER_SCENE) for _, t in keys])
    assert (scene[sims.argmax(axis=1)] == scene).all()


def test_embed_videos_from_a_folder_then_resume(ray_local, tmp_path, video_folder):
    run_dir = str(tmp_path / "run")
    record = runner.run_stages(_cfg(str(video_folder), run_dir), ["embed"])["embed"]
    _check_run(run_dir, record)
    again = runner.run_stages(_cfg(str(video_folder), run_dir, mode="resume"), ["embed"])["embed"]
    assert again["processed_this_run"] == 0 and again["already_committed"] == record["listed"]
    with pytest.raises(Exception, match="frame_interval"):
        runner.run_stages(
            _cfg(str(video_folder), run_dir, mode="resume", **{"embed.frame_interval": 3.0}),
            ["embed"],
        )


@pytest.mark.slow
def test_embed_videos_from_s3(ray_local, tmp_path, s3_server, s3_bucket, video_folder):
    upload_folder(s3_server.client(), s3_bucket, video_folder, "media")
    run_dir = f"s3://{s3_bucket}/runs/v"
    record = runner.run_stages(_cfg(f"s3://{s3_bucket}/media/", run_dir), ["embed"])["embed"]
    _check_run(run_dir, record)


def test_frames_through_cluster_index_report_search_and_serve(ray_local, tmp_path, video_folder):
    """Every later stage takes frame rows: the report captions a frame with its time and shows
    the frame itself, search hits and the service's rows carry frame_time, and the service
    serves a frame as a JPEG of that frame."""
    from semclust.cli import main
    from semclust.index.search import SearchIndex
    from semclust.serve.catalog import RunCatalog

    run = tmp_path / "run"
    embed = ["embed", str(video_folder), "--run-dir", str(run), "--backbone", "efficientnet_lite0"]
    embed += ["--weights", "default", "--frame-interval", "2", "--rows-per-part", "16"]
    assert main(embed) == 0
    assert main(["cluster", "--run-dir", str(run), "--k", "3", "--set", "cluster.nredo=3"]) == 0
    for stage in ("graph", "index", "report"):
        assert main([stage, "--run-dir", str(run)]) == 0, stage
    html = "".join(p.read_text() for p in (run / "report").rglob("*.html"))
    assert "talk.mp4 @ 0:" in html and "still.jpg" in html
    assert "no thumbnail" not in html  # every frame shown was decoded for its picture
    assert "video ends early or is broken" in html  # half.webm's later frames, on the failures page

    index = SearchIndex(str(run))
    embedded, _ = _frames_of(str(run))
    _, vec = embedded[("lecture.webm", 10.0)]
    (hits,) = index.search_vectors(vec[None, :].astype(np.float32), k=3)
    assert hits[0].frame_time == 10.0 and hits[0].uri.endswith("lecture.webm")
    assert hits[0].label.endswith("lecture.webm @ 0:10.0")
    catalog = RunCatalog(str(run))
    (row,) = catalog.describe_rows(np.array([catalog.row_of(hits[0].image_id)]))
    assert row["frame_time"] == 10.0
    jpeg = catalog.image_bytes(hits[0].image_id)
    assert jpeg[:3] == b"\xff\xd8\xff"  # the frame, not the video's bytes
    frame = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert frame.shape == (96, 128, 3)  # the video's own frame size
    diffs = [np.abs(frame.astype(int) - p.astype(int)).mean() for p in scene_pictures()]
    assert int(np.argmin(diffs)) == 2 and min(diffs) < 12  # 10 s: the third scene


@pytest.mark.slow
def test_a_store_that_goes_away_defers_frames_instead_of_failing_them(
    tmp_path, video_folder, monkeypatch
):
    """The S3 server stopped between the listing (probe) and the decode, then after the first
    frame: the frames whose reads outlast storage.retry_seconds are deferred (a resume reads
    them), never failure rows saying the video is broken."""
    from semclust.config import StorageConfig
    from semclust.embed import video
    from semclust.embed.actors import decode_stage
    from tests.s3server import start_s3_server

    server = start_s3_server(tmp_path / "s3")
    try:
        client = server.client()
        client.create_bucket(Bucket="away")
        # Larger than one 4 MB block: a later seek needs a read after the store went away.
        big = write_video(tmp_path / "long.mp4", scene_pictures() * 8, seconds_per_scene=6, fps=10)
        assert big.stat().st_size > 8 * (16 << 10)
        client.put_object(Bucket="away", Key="long.mp4", Body=big.read_bytes())
        settings = StorageConfig(endpoint_url=server.endpoint, region="us-east-1", retry_seconds=1)
        with storage.using(settings):
            uri = "s3://away/long.mp4"
            info = probe(uri)
            times = Sampling(30.0, 500).times(info.duration)
            assert len(times) == 5 and info.duration == pytest.approx(144.0, abs=0.3)
            batch = {
                "uri": np.array([uri] * len(times), dtype=object),
                "offset": np.full(len(times), -1),
                "size": np.full(len(times), -1),
                "frame_time": np.array(times, dtype=np.float32),
                "frame_index": np.arange(len(times), dtype=np.int32),
                "part": np.zeros(len(times), dtype=np.int64),
            }
            server.stop()
            out = decode_stage(batch, size=32, resize="squash", max_pixels=10**8)
            assert list(out["error_stage"]) == ["deferred"] * len(times), list(out["error"])
            assert all("read failed" in e for e in out["error"])
            server.restart()
            again = decode_stage(batch, size=32, resize="squash", max_pixels=10**8)
            assert list(again["error"]) == [""] * len(times)
            # Away after the first frame: the open container's next reads (16 KB blocks here,
            # so each later frame needs new ones) fail for good; those frames are deferred.
            monkeypatch.setattr(video, "_BLOCK", 16 << 10)
            container, raw = video._open(uri, -1, -1, video._BLOCK)
            results = [video.FrameResult() for _ in times]
            video._decode_in_order(container, times[:1], results[:1], 32, "squash", 10**8)
            assert results[0].error == "" and results[0].pixels is not None
            server.stop()
            video._decode_in_order(container, times[1:], results[1:], 32, "squash", 10**8)
            assert all(r.transient for r in results[1:]), [r.error for r in results]
            container.close()
            raw.close()
    finally:
        server.stop()


def test_videos_in_a_manifest_and_in_tar_shards(tmp_path, video_folder, pictures):
    """A manifest names videos by extension (its rows are listed whatever they are); a tar's
    video members are read through their byte range, so the frames equal the file's."""
    from tests.embed.files import tar_bytes

    talk = video_folder / "talk.mp4"
    still = video_folder / "still.jpg"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{talk}\n{still}\n{video_folder / 'junk.mp4'}\n")
    stream = InputStream(str(manifest), sampling=Sampling(4.0, 500))
    table = pa_concat(list(stream.pages()))
    times = table["frame_time"].to_pylist()  # in the manifest's order
    assert times[:3] == [0.0, 4.0, 8.0] and math.isnan(times[3]) and times[4] == UNREADABLE_VIDEO
    assert len(times) == 5
    assert (stream.videos, stream.video_frames, stream.videos_unreadable) == (2, 3, 1)

    shard = tmp_path / "shard.tar"
    shard.write_bytes(
        tar_bytes({"a/still.jpg": still.read_bytes(), "a/talk.mp4": talk.read_bytes()})
    )
    stream = InputStream(str(shard), sampling=Sampling(4.0, 500))
    table = pa_concat(list(stream.pages()))
    columns = [table[c].to_pylist() for c in ("uri", "offset", "size", "frame_time")]
    rows = list(zip(*columns, strict=True))
    frames = [r for r in rows if r[3] == r[3]]  # not NaN: a video member's frames
    assert [r[3] for r in frames] == [0.0, 4.0, 8.0]
    assert all(r[0] == f"file://{shard}#a/talk.mp4" and r[1] > 0 for r in frames)
    uri, offset, size, _ = frames[0]
    got = decode_video_rows(uri, offset, size, [0.0, 4.0, 8.0], 64, "squash", 10**8)
    direct = decode_video_rows(str(talk), -1, -1, [0.0, 4.0, 8.0], 64, "squash", 10**8)
    for a, b in zip(got, direct, strict=True):
        assert a.error == "" and np.array_equal(a.pixels, b.pixels)
