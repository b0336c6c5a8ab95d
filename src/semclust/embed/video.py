"""Video input: which files are videos, which frames to take, and decoding those frames.

Videos are decoded with PyAV (FFmpeg's libraries in its wheel: H.264, HEVC, VP8/VP9, AV1, MPEG-4
and the mp4/mov/mkv/webm/avi/mpeg containers, with no system FFmpeg needed on a node). A video is
never copied whole: FFmpeg reads it through ``BlockFile``, aligned ranged reads of a few MB
(retried like every storage read), so probing a video costs its header (and, for an mp4 whose
index is at the end, its tail), and a frame costs the data from the keyframe before it.

Sampling (``Sampling.times``): one frame every ``interval`` seconds from 0 while before the
video's end; a video longer than ``interval * max_frames`` gets ``max_frames`` frames spread
evenly instead, so a ten-hour recording is still covered end to end. Decoding
(``decode_video_rows``) takes the times in order, seeks to the keyframe before a time unless it is
at most ``_SEEK_AHEAD`` seconds past the frame decoded last (then decoding on is cheaper), and
keeps the first frame at or after the time. A decode error or an early end fails that frame and
every later one of the video ("video ends early or is broken"); the frames before it are kept.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.embed.members import tar_member_parts
from semclust.errors import StoreUnavailable
from semclust.retry import is_transient, retry_call
from semclust.rundir.frames import UNREADABLE_VIDEO, frame_id
from semclust.storage import image_id_for

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".3gp", ".wmv"}
)
_BLOCK = 4 << 20  # bytes per ranged read while decoding
_PROBE_BLOCK = 256 << 10  # smaller blocks for a probe: it reads a header, maybe a tail
_CACHED_BLOCKS = 4
_SEEK_AHEAD = 2.0  # seconds: a target this close after the last decoded frame is decoded to
_VIDEO_PROBES = 8  # videos probed at once while listing: each costs a few ranged reads


class VideoError(ValueError):
    """Why a video (or one of its frames) cannot be used; str() is the failures/ reason.
    ``transient``: the store did not answer within the retry budget (the row is deferred)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def has_video_extension(path: str) -> bool:
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower() in VIDEO_EXTENSIONS


def sniff_video_format(head: bytes) -> str | None:
    """Container name from a file's first bytes (mp4/mov, matroska/webm, avi, mpeg, asf), or None.
    An ISO-BMFF ``ftyp`` file counts as video unless it is an image (HEIF/AVIF: formats.py)."""
    from semclust.embed.formats import sniff_image_format

    head = bytes(head)
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return None if sniff_image_format(head) else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return "mpeg"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "asf"
    return None


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video become rows (``embed.frame_interval``,
    ``embed.max_frames_per_video``)."""

    interval: float = 30.0
    max_frames: int = 500

    def times(self, duration: float) -> list[float]:
        """Frame times in seconds (rounded to milliseconds) for a video of ``duration`` seconds;
        always at least the first frame."""
        count = max(1, math.ceil(duration / self.interval - 1e-9)) if duration > 0 else 1
        step = self.interval
        if count > self.max_frames:
            count, step = self.max_frames, duration / self.max_frames
        return [round(i * step, 3) for i in range(count)]


class BlockFile(io.RawIOBase):
    """A read-only, seekable file over a stored object (or a byte range of one, for a tar member)
    read in aligned blocks of ``block`` bytes, the last few kept; every read is retried on
    transient errors like any storage read."""

    def __init__(self, uri: str, offset: int = -1, size: int = -1, *, block: int = _BLOCK) -> None:
        super().__init__()
        self.uri = uri
        target = tar_member_parts(uri, offset, size)[0] if offset >= 0 else uri
        fs, path = storage.resolve(target)
        self._file = retry_call(
            lambda: fs.open_input_file(path), storage.retry_policy(), f"open {uri}"
        )
        self._base = max(offset, 0)
        self._size = size if offset >= 0 else self._file.size()
        self._block = block
        self._pos = 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def _get(self, number: int) -> bytes:
        data = self._blocks.get(number)
        if data is None:
            start = number * self._block
            length = min(self._block, self._size - start)
            data = retry_call(
                lambda: self._file.read_at(length, self._base + start),
                storage.retry_policy(),
                f"read {self.uri}",
            )
            if len(self._blocks) >= _CACHED_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))  # the oldest block
            data = self._blocks[number] = bytes(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        done = 0
        while done < want:
            number, within = divmod(self._pos, self._block)
            data = self._get(number)[within : within + want - done]
            if not data:
                break
            view[done : done + len(data)] = data
            done += len(data)
            self._pos += len(data)
        return done

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self._blocks.clear()
        super().close()


def frame_rows(table: pa.Table, videos: list[int], sampling: Sampling) -> pa.Table:
    """A listing page (``sources.PAGE_SCHEMA``) with the row of each video (``videos``: row
    numbers) replaced by its sampled frames' rows in time order, or by one ``UNREADABLE_VIDEO``
    row when it cannot be probed (its decode task records why). Videos are probed
    ``_VIDEO_PROBES`` at once; a store that stays away is raised, as for a listing request."""
    uris = table.column("uri").to_pylist()
    offsets = table.column("offset").to_pylist()
    sizes = table.column("size").to_pylist()
    probe_times = storage.carry(_probe_times)
    with ThreadPoolExecutor(min(_VIDEO_PROBES, len(videos))) as pool:
        found = pool.map(lambda i: probe_times(uris[i], offsets[i], sizes[i], sampling), videos)
        times = dict(zip(videos, found, strict=True))
    rows: dict[str, list[Any]] = {name: [] for name in table.schema.names}
    for i, uri in enumerate(uris):
        frame_times = times.get(i)
        if frame_times is None:  # a still image: as it was
            frame_times, indices, ids = [math.nan], [-1], [image_id_for(uri)]
        elif not frame_times:  # unreadable: one row, the failure's
            frame_times, indices, ids = [UNREADABLE_VIDEO], [-1], [image_id_for(uri)]
        else:
            indices = list(range(len(frame_times)))
            ids = [frame_id(uri, t) for t in frame_times]
        for t, index, image_id in zip(frame_times, indices, ids, strict=True):
            rows["uri"].append(uri)
            rows["offset"].append(offsets[i])
            rows["size"].append(sizes[i])
            rows["image_id"].append(image_id)
            rows["frame_time"].append(t)
            rows["frame_index"].append(index)
    return pa.table(rows, schema=table.schema)


def _probe_times(uri: str, offset: int, size: int, sampling: Sampling) -> list[float]:
    """The frame times of a video, or [] when it is not a readable video (a transient error
    that outlasted the retries is raised)."""
    try:
        info = probe(uri, offset, size)
    except VideoError as exc:
        if exc.transient:
            raise StoreUnavailable(f"cannot read {uri} while listing: {exc}") from exc
        return []
    return sampling.times(info.duration)


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    width: int
    height: int
    codec: str


def _open(uri: str, offset: int, size: int, block: int) -> tuple[Any, BlockFile]:
    """(PyAV container, its file) or VideoError: what FFmpeg or the store said."""
    import av

    try:
        raw = BlockFile(uri, offset, size, block=block)
    except Exception as exc:
        raise VideoError(
            f"read failed: {type(exc).__name__}: {storage.redact(str(exc))}",
            transient=is_transient(exc),
        ) from exc
    try:
        container = av.open(raw, mode="r", metadata_errors="ignore")
    except Exception as exc:
        raw.close()
        raise _video_error("cannot open video", exc) from exc
    if not container.streams.video:
        container.close()
        raw.close()
        raise VideoError(f"no video stream in the file (format {container.format.name})")
    container.streams.video[0].thread_type = "AUTO"  # frame threads, before the codec opens
    return container, raw


def _video_error(what: str, exc: BaseException) -> VideoError:
    if isinstance(exc, VideoError):
        return exc
    cause: BaseException | None = exc
    while cause is not None and not is_transient(cause) and cause.__cause__ is not None:
        cause = cause.__cause__
    transient = cause is not None and is_transient(cause)
    return VideoError(
        f"{what}: {type(exc).__name__}: {storage.redact(str(exc))}", transient=transient
    )


def probe(uri: str, offset: int = -1, size: int = -1) -> VideoInfo:
    """Duration, size and codec of a video's first video stream; VideoError if it is not a
    readable video. Reads the header (and the packets' timestamps only when the container does
    not state a duration)."""
    container, raw = _open(uri, offset, size, _PROBE_BLOCK)
    try:
        stream = container.streams.video[0]
        duration = _duration(container, stream)
        return VideoInfo(
            duration,
            stream.codec_context.width,
            stream.codec_context.height,
            stream.codec_context.name,
        )
    except VideoError:
        raise
    except Exception as exc:
        raise _video_error("cannot read video", exc) from exc
    finally:
        container.close()
        raw.close()


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    end = 0.0  # no stated duration (some mkv/webm, raw mpeg): the last packet's end
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    return max(0.0, end - start)


@dataclass
class FrameResult:
    """One sampled frame: pixels (size, size, 3) uint8 and the frame's size, or an error."""

    pixels: np.ndarray | None = None
    width: int = 0
    height: int = 0
    error: str = ""
    transient: bool = False


def decode_video_rows(
    uri: str,
    offset: int,
    size: int,
    times: Sequence[float],
    image_size: int,
    resize: str,
    max_pixels: int,
) -> list[FrameResult]:
    """The frames of one video at ``times`` (seconds, any order), one result per time, never
    raising for a bad video. A time < 0 (a video whose probe failed at listing) gets that
    failure's reason."""
    results = [FrameResult() for _ in times]
    if any(t < 0 for t in times):
        try:
            probe(uri, offset, size)
            reason = VideoError("video could not be read when it was listed")
        except VideoError as exc:
            reason = exc
        for r in results:
            r.error, r.transient = str(reason), reason.transient
        return results
    try:
        container, raw = _open(uri, offset, size, _BLOCK)
    except VideoError as exc:
        for r in results:
            r.error, r.transient = str(exc), exc.transient
        return results
    try:
        _decode_in_order(container, times, results, image_size, resize, max_pixels)
    finally:
        container.close()
        raw.close()
    return results


def _decode_in_order(
    container: Any,
    times: Sequence[float],
    results: list[FrameResult],
    image_size: int,
    resize: str,
    max_pixels: int,
) -> None:
    from semclust.embed.decode import fit_pixels

    stream = container.streams.video[0]
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None else 0.0
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    tolerance = 0.5 / rate
    frames = None
    position = -math.inf  # time of the frame decoded last
    order = sorted(range(len(times)), key=lambda i: times[i])
    for n, i in enumerate(order):
        t = float(times[i])
        try:
            if frames is None or t - position > _SEEK_AHEAD or t < position:
                container.seek(int((start + t) / base), stream=stream, backward=True)
                frames = container.decode(stream)
            frame = None
            for candidate in frames:
                if candidate.time is None:
                    continue
                position = float(candidate.time) - start
                if position >= t - tolerance:
                    frame = candidate
                    break
            if frame is None:
                last = f"last frame at {position:.3f} s" if position > -math.inf else "no frame"
                raise VideoError(f"video ends early or is broken: no frame at {t:.3f} s ({last})")
            if frame.width * frame.height > max_pixels:
                raise VideoError(
                    f"frame too large: {frame.width} x {frame.height} pixels exceeds "
                    f"max_pixels={max_pixels}"
                )
            results[i].pixels = fit_pixels(frame.to_image(), image_size, resize)
            results[i].width, results[i].height = frame.width, frame.height
        except Exception as exc:
            err = _video_error("video ends early or is broken", exc)
            for j in order[n:]:  # this frame and every later one
                results[j].error, results[j].transient = str(err), err.transient
            return
