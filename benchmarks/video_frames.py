"""Video frames: semclust's sampled decode (keyframe seeks, ``video.decode_video_rows``) against
what a user writes by hand with PyAV (decode every frame, keep the first at or after each
sampled time), on the same video in the same run; and the listing probe's cost.

The video is written here with PyAV: ``--minutes`` of H.264 at 25 fps, 640 x 360, a keyframe
every ``--gop`` seconds, scenes of the packaged photos panned a little per frame (so it is not
a still). Both readers take the frames at 0, interval, 2 x interval, ... and must return the same
frame times; the figures are seconds per sampled frame and the ratio hand / semclust.

    python benchmarks/video_frames.py                       # 10 min, one frame per 30 s
    python benchmarks/video_frames.py --minutes 2 --interval 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_video(path: Path, minutes: float, fps: int, gop: int) -> None:
    import av

    from semclust.demo import source_photos

    size = (640, 360)
    photos = []
    for p in sorted(source_photos().values())[:6]:
        with Image.open(p) as im:
            photos.append(np.asarray(im.convert("RGB").resize((size[0] + 64, size[1]))))
    frames = int(minutes * 60 * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(fps * gop), "preset": "veryfast"}
        for i in range(frames):
            photo = photos[(i // (fps * 20)) % len(photos)]  # a new scene every 20 s
            shift = i % 64
            frame = np.ascontiguousarray(photo[:, shift : shift + size[0]])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def hand_written(path: Path, times: list[float]) -> list[float]:
    """What a user writes: decode every frame in order, keep the first at or after each time."""
    import av

    got: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        targets = iter(times)
        want = next(targets, None)
        for frame in container.decode(stream):
            if want is None:
                break
            if frame.time is not None and frame.time >= want - 0.02:
                frame.to_image().resize((224, 224))  # the same per-frame work as semclust's
                got.append(round(float(frame.time), 3))
                want = next(targets, None)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=2, help="seconds between keyframes")
    args = p.parse_args()

    from semclust.embed.video import Sampling, decode_video_rows, probe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        t0 = time.perf_counter()
        write_video(path, args.minutes, args.fps, args.gop)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = probe(str(path))
        probe_s = time.perf_counter() - t0
        times = Sampling(args.interval, 500).times(info.duration)
        t0 = time.perf_counter()
        ours = decode_video_rows(str(path), -1, -1, times, 224, "center_crop", 10**9)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = hand_written(path, times)
        theirs_s = time.perf_counter() - t0
        errors = [r.error for r in ours if r.error]
        if errors or len(theirs) != len(times):
            raise SystemExit(f"readers disagree: {errors[:3]}, hand-written got {len(theirs)}")
        print(
            json.dumps(
                {
                    "video": {
                        "minutes": args.minutes,
                        "fps": args.fps,
                        "keyframe_every_s": args.gop,
                        "bytes": path.stat().st_size,
                        "encode_seconds": round(encode_s, 2),
                    },
                    "frames": len(times),
                    "probe_seconds": round(probe_s, 4),
                    "semclust_seconds": round(ours_s, 3),
                    "hand_written_seconds": round(theirs_s, 3),
                    "semclust_ms_per_frame": round(1000 * ours_s / len(times), 1),
                    "hand_written_ms_per_frame": round(1000 * theirs_s / len(times), 1),
                    "speedup": round(theirs_s / ours_s, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
