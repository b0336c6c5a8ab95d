"""Real videos written in the tests with PyAV: scenes of distinct photos, each shown for a set
number of seconds, in H.264/mp4 or VP9/webm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from semclust.demo import source_photos

SCENES = ("astronaut", "coffee", "chelsea")  # three photos that look nothing alike
SIZE = (128, 96)


def scene_pictures(names: tuple[str, ...] = SCENES) -> list[np.ndarray]:
    """The scenes' photos as (96, 128, 3) uint8 RGB frames."""
    photos = source_photos()
    out = []
    for name in names:
        with Image.open(photos[name]) as im:
            out.append(np.asarray(im.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR)))
    return out


def write_video(
    path: Path,
    pictures: list[np.ndarray],
    *,
    seconds_per_scene: int = 4,
    fps: int = 5,
    codec: str = "libx264",
    keyframe_seconds: int = 2,
    faststart: bool = False,
) -> Path:
    """Each picture shown for ``seconds_per_scene`` at ``fps``, a keyframe every
    ``keyframe_seconds``; the container from the suffix (``.mp4``, ``.webm``, ``.mkv``).
    ``faststart``: an mp4's index before its data (as streaming sites write it), so that a
    truncated copy still opens."""
    import av

    rng = np.random.default_rng(len(pictures))
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(fps * keyframe_seconds)}
        for picture in pictures:
            for _ in range(seconds_per_scene * fps):
                # A little noise per frame, so frames are not bit-identical (as in real footage).
                jitter = rng.integers(-3, 4, picture.shape)
                pixels = np.clip(picture.astype(int) + jitter, 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
