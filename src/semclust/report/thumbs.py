"""Thumbnails beside the report, made once in Ray tasks.

A thumbnail is ``thumbs/<2 hex>/<16 hex>.jpg``, named by image id, so a re-run (or a report of a
re-clustered run) reuses every thumbnail already there and links stay relative. Originals are
read with :func:`semclust.storage.read_bytes` and decoded by the embed stage's decoder, so a
thumbnail shows the image the way the model was given it (EXIF-oriented, alpha on white).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from semclust import storage
from semclust.embed.decode import DEFAULT_MAX_PIXELS, decode_image
from semclust.embed.video import decode_video_rows
from semclust.report.collect import Remote
from semclust.report.files import write_file

log = logging.getLogger(__name__)

THUMBS_DIR = "thumbs"
_JPEG_QUALITY = 82


def thumb_relpath(image_id: int) -> str:
    """Path of an image's thumbnail relative to the report folder (always with ``/``)."""
    name = f"{image_id:016x}"
    return f"{THUMBS_DIR}/{name[:2]}/{name}.jpg"


def thumb_size(width: int, height: int, box: int) -> tuple[int, int]:
    """Size of the thumbnail of a ``width`` x ``height`` image fitted in a ``box`` square."""
    if width <= 0 or height <= 0:
        return box, box
    scale = box / max(width, height)
    return max(1, min(box, round(width * scale))), max(1, min(box, round(height * scale)))


def make_thumbnail(data: bytes, box: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of an image fitted into ``box`` x ``box`` pixels, aspect ratio kept."""
    decoded = decode_image(data, box, resize="pad", max_pixels=max_pixels)
    return _thumbnail_jpeg(decoded.pixels, decoded.width, decoded.height, box)


def make_frame_thumbnail(
    uri: str, frame_time: float, box: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> bytes:
    """JPEG bytes of a video's frame at ``frame_time`` (decoded as the embed stage does)."""
    frame = decode_video_rows(uri, -1, -1, [frame_time], box, "pad", max_pixels)[0]
    if frame.error or frame.pixels is None:
        raise ValueError(frame.error or "no frame")
    return _thumbnail_jpeg(frame.pixels, frame.width, frame.height, box)


def _thumbnail_jpeg(pixels: Any, width: int, height: int, box: int) -> bytes:
    from PIL import Image

    # "pad" centres the fitted image on a square canvas: cut the letterbox bars off again.
    w, h = thumb_size(width, height, box)
    left, top = (box - w) // 2, (box - h) // 2
    img = Image.fromarray(pixels).crop((left, top, left + w, top + h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def thumbnail_batch(
    items: Sequence[tuple[int, str, float | None]], report_uri: str, box: int, max_pixels: int
) -> list[tuple[int, str]]:
    """Ray task: make and write the thumbnails of (image_id, uri, frame_time) rows (frame_time
    None for a still image).

    Returns (image_id, error) for each image whose thumbnail could not be made; an unreadable
    original costs its own thumbnail, never the batch.
    """
    errors: list[tuple[int, str]] = []
    for image_id, uri, frame_time in items:
        try:
            if frame_time is None:
                jpeg = make_thumbnail(storage.read_bytes(uri), box, max_pixels)
            else:
                jpeg = make_frame_thumbnail(uri, frame_time, box, max_pixels)
        except Exception as exc:  # the report shows the reason in place of the picture
            errors.append((image_id, f"{type(exc).__name__}: {exc}"))
            continue
        write_file(storage.join(report_uri, *thumb_relpath(image_id).split("/")), jpeg)
    return errors


@dataclass
class ThumbnailResult:
    made: int = 0
    reused: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # image_id -> reason
    seconds: float = 0.0


def existing_thumbnails(report_uri: str) -> set[str]:
    """Relative paths of the thumbnails already under the report folder."""
    root = storage.join(report_uri, THUMBS_DIR)
    if not storage.is_dir(root):
        return set()
    prefix = storage.canonical_uri(report_uri).rstrip("/") + "/"
    found = set()
    for uri, size in storage.list_files(root):
        if size > 0 and uri.startswith(prefix):
            found.add(uri[len(prefix) :])
    return found


def make_thumbnails(
    images: dict[int, tuple[str, float | None]],
    report_uri: str,
    box: int,
    per_task: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    remote: Remote,
) -> ThumbnailResult:
    """Make the missing thumbnails of ``images`` (image_id -> (original URI, frame time or None))
    in Ray tasks made by ``remote`` (``RunContext.remote``)."""
    import ray

    start = time.perf_counter()
    have = existing_thumbnails(report_uri)
    todo = sorted((i, u, t) for i, (u, t) in images.items() if thumb_relpath(i) not in have)
    result = ThumbnailResult(reused=len(images) - len(todo))
    if todo:
        log.info(
            "report: making %d thumbnails (%d already there) in %d Ray tasks",
            len(todo),
            result.reused,
            math.ceil(len(todo) / per_task),
        )
        task = remote(thumbnail_batch, num_cpus=1)
        futures = {
            task.remote(todo[s : s + per_task], report_uri, box, max_pixels): min(
                per_task, len(todo) - s
            )
            for s in range(0, len(todo), per_task)
        }
        pending = list(futures)
        finished = 0
        last_log = time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=30)
            for f in done:
                result.failed.update(ray.get(f))
                finished += futures[f]
            if time.monotonic() - last_log > 5 or not pending:
                log.info("report: thumbnails %d/%d", finished, len(todo))
                last_log = time.monotonic()
    result.made = len(todo) - len(result.failed)
    result.seconds = round(time.perf_counter() - start, 3)
    if result.failed:
        log.warning(
            "report: %d thumbnails could not be made (e.g. %s)",
            len(result.failed),
            next(iter(result.failed.values())),
        )
    return result
