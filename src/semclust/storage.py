"""URIs -> filesystems, and the few file operations the stages need.

Every stage addresses data by URI: a local path, ``file://...`` or ``s3://bucket/key``. Local
writes go to a temporary name and are renamed when whole; an S3 PUT is atomic by itself, so a
reader never sees half a shard on either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_ID_MASK = (1 << 63) - 1
T = TypeVar("T")


def image_id_for(uri: str) -> int:
    """Stable 63-bit id of a URI (BLAKE2b): equal across runs and machines, a valid FAISS id."""
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _ID_MASK


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs")


def canonical_uri(path_or_uri: str) -> str:
    """``file:///abs/path`` for local paths, the URI itself for object storage."""
    parsed = urlparse(path_or_uri)
    if parsed.scheme in ("s3", "gs", "gcs"):
        return path_or_uri.rstrip("/") if path_or_uri.endswith("/") else path_or_uri
    if parsed.scheme == "file":
        path_or_uri = parsed.path
    elif parsed.scheme:
        raise ValueError(
            f"unsupported URI scheme {parsed.scheme!r} in {path_or_uri!r}; use a local path, "
            "file://, or s3://"
        )
    return "file://" + str(Path(path_or_uri).expanduser().resolve())


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 or an S3-compatible store. Credentials are never part of it: they come
    from the standard AWS chain (environment, shared profile files, instance identity)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for a local store
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False


def s3_options_from_env() -> S3Options:
    """The standard AWS variables AWS_ENDPOINT_URL(_S3) and AWS_REGION (AWS_PROFILE and the
    credentials are read by pyarrow's own AWS chain)."""
    return S3Options(
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )


def s3_options_from_config(section: Any) -> S3Options:
    """The ``storage`` section of a run config over the standard AWS environment: a field set in
    the config wins, an unset one falls back to AWS_ENDPOINT_URL / AWS_REGION."""
    env = s3_options_from_env()
    return S3Options(
        endpoint_url=section.endpoint_url or env.endpoint_url,
        region=section.region or env.region,
        profile=section.profile,
        anonymous=bool(section.anonymous),
    )


_s3_options = s3_options_from_env()


def configure_s3(options: S3Options) -> None:
    """Set this process's S3 options; the filesystem is rebuilt on next use (new credentials are
    picked up too)."""
    global _s3_options
    _s3_options = options
    _s3_filesystem.cache_clear()


def s3_options() -> S3Options:
    return _s3_options


def with_s3_options(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` bound to this process's S3 options, for Ray tasks: a worker on another node has
    only its own environment, so the driver's options (from the config) travel with the call."""
    options = _s3_options

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> T:
        if options != s3_options():
            configure_s3(options)
        return fn(*args, **kwargs)

    return bound


def _aws_credentials(profile: str) -> tuple[str, str, str | None] | None:
    """A named profile's credentials via botocore, so profiles and SSO work as in the AWS CLI."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    creds = session.get_credentials()
    if creds is None:
        return None
    frozen = creds.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


@functools.lru_cache(maxsize=4)
def _s3_filesystem() -> pafs.FileSystem:
    opts = _s3_options
    endpoint = (
        opts.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    kwargs["region"] = opts.region or "us-east-1"
    if opts.anonymous:
        kwargs["anonymous"] = True
    elif opts.profile:
        # pyarrow has no profile argument; botocore resolves it as the AWS CLI would. Without a
        # profile, pyarrow's own default chain is used, which refreshes temporary credentials.
        creds = _aws_credentials(opts.profile)
        if creds is None:
            raise ValueError(f"AWS profile {opts.profile!r} has no credentials")
        kwargs["access_key"], kwargs["secret_key"], token = creds
        if token:
            kwargs["session_token"] = token
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI or local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), canonical_uri(uri)[len("file://") :]


_ACCESS_HINTS = (
    ("SIGNATURE_DOES_NOT_MATCH", "the secret key is wrong"),
    ("SignatureDoesNotMatch", "the secret key is wrong"),
    ("INVALID_ACCESS_KEY_ID", "the access key id is unknown"),
    ("InvalidAccessKeyId", "the access key id is unknown"),
    ("ACCESS_DENIED", "access is denied"),
    ("AccessDenied", "access is denied"),
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NoSuchBucket", "the bucket does not exist"),
)


def explain_access_error(uri: str, exc: BaseException) -> ValueError:
    """A clear, credential-free error for a failed object-storage access."""
    text = str(exc)
    reason = next((hint for code, hint in _ACCESS_HINTS if code in text), None)
    if reason is None:
        reason = f"{type(exc).__name__}: {redact(text)}"
    return ValueError(
        f"cannot access {uri}: {reason}. Check the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and the endpoint/region settings"
    )


def redact(text: str) -> str:
    """Remove any credential of the current AWS chain from a message."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def check_access(uri: str, *, must_exist: bool) -> None:
    """Fail at once, with a clear message, when a location cannot be reached.

    For object storage the bucket must exist and the credentials must be accepted; with
    ``must_exist`` the URI itself must exist too (an input), otherwise it may be created (a run
    directory).
    """
    fs, path = resolve(uri)
    try:
        # One cheap request; a wrong key or a missing permission fails it with a 403.
        info = fs.get_file_info(path)
        if is_remote(uri) and info.type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ValueError(f"cannot access {uri}: bucket {bucket!r} does not exist")
    except ValueError:
        raise
    except OSError as exc:
        raise explain_access_error(uri, exc) from None
    if must_exist and info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")


def join(base: str, *parts: str) -> str:
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old file or the new one."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_name(path)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Parquet shard atomically (temporary name + rename locally; one PUT on S3)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_name(path)
        pq.write_table(table, tmp, filesystem=fs)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_num_rows(uri: str) -> int:
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def list_files(uri: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(URI, size) of every file under a folder/prefix, hidden names (``.x``) skipped."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        yield _to_uri(uri, info.path), info.size
        return
    selector = pafs.FileSelector(path, recursive=recursive)
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(path) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        yield _to_uri(uri, entry.path), entry.size


def _to_uri(base_uri: str, fs_path: str) -> str:
    scheme = urlparse(base_uri).scheme
    if scheme in ("s3", "gs", "gcs"):
        return f"{scheme}://{fs_path}"
    return "file://" + fs_path


def list_shards(dir_uri: str) -> list[str]:
    """Committed ``part-*.parquet`` shards of a run-directory folder, sorted by name."""
    fs, path = resolve(dir_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = [
        e.base_name
        for e in fs.get_file_info(pafs.FileSelector(path))
        if e.type == pafs.FileType.File
        and e.base_name.startswith("part-")
        and e.base_name.endswith(".parquet")
    ]
    return [join(dir_uri, n) for n in sorted(names)]


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


# --- paginated listing ---------------------------------------------------------------------------

LIST_PAGE_SIZE = 1000  # S3's own maximum keys per ListObjectsV2 page
_PAGE_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64())])


def _file_page(rows: list[tuple[str, int]]) -> pa.Table:
    uris, sizes = zip(*rows, strict=True) if rows else ((), ())
    return pa.table(
        {"uri": pa.array(uris, pa.string()), "size": pa.array(sizes, pa.int64())},
        schema=_PAGE_SCHEMA,
    )


def s3_list_client(options: S3Options | None = None) -> Any:
    """A botocore S3 client for listing, from the same options as the pyarrow filesystem.

    Credentials come from botocore's standard chain (environment, profile, instance role), so
    none is ever passed around or printed; ``anonymous`` sends unsigned requests.
    """
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    opts = options or _s3_options
    endpoint = (
        opts.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    config: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 5}}
    if endpoint:  # S3-compatible stores, like pyarrow's endpoint_override, are path-style
        config["s3"] = {"addressing_style": "path"}
    if opts.anonymous:
        config["signature_version"] = UNSIGNED
    session = botocore.session.Session(profile=opts.profile)
    return session.create_client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=opts.region or "us-east-1",
        config=Config(**config),
    )


def iter_file_pages(
    uri: str, *, page_size: int = LIST_PAGE_SIZE, s3_client: Any = None
) -> Iterator[pa.Table]:
    """Pages (``uri``, ``size``) of the files under a folder/prefix, in sorted URI order, lazily.

    The same files and order as ``sorted(list_files(uri))`` (hidden names skipped), without
    holding the whole listing: S3 is paged with ListObjectsV2 (keys come back in binary order,
    which is the order of Python strings), a local tree is walked one directory at a time. A
    single directory's entries are held while it is walked (the OS returns them unsorted); gs://
    falls back to pyarrow's full listing. Pages may be shorter than ``page_size``.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    fs, path = resolve(uri)
    scheme = urlparse(uri).scheme
    if scheme == "s3" or isinstance(fs, pafs.LocalFileSystem):
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise explain_access_error(uri, exc) from None
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            yield _file_page([(_to_uri(uri, info.path), info.size)])
            return
        rows = _iter_s3_files(uri, path, page_size, s3_client) if scheme == "s3" else None
        if rows is None:
            rows = (("file://" + p, s) for p, s in _walk_sorted(path))
    else:
        rows = iter(sorted(list_files(uri)))
    page: list[tuple[str, int]] = []
    for row in rows:
        page.append(row)
        if len(page) >= page_size:
            yield _file_page(page)
            page = []
    if page:
        yield _file_page(page)


def _walk_sorted(root: str) -> Iterator[tuple[str, int]]:
    """(path, size) of files under ``root`` in the order of their sorted full paths.

    A directory sorts by ``name + "/"``: every path below it starts with that, so walking
    entries in this order gives exactly the global string order, one directory at a time.
    """
    entries: list[tuple[str, str, bool]] = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir()
            if is_dir or entry.is_file():
                entries.append((entry.name + "/" if is_dir else entry.name, entry.path, is_dir))
    entries.sort()
    for _, entry_path, is_dir in entries:
        if is_dir:
            yield from _walk_sorted(entry_path)
        else:
            yield entry_path, os.stat(entry_path).st_size


def _iter_s3_files(uri: str, path: str, page_size: int, client: Any) -> Iterator[tuple[str, int]]:
    """(URI, size) of the objects under an S3 prefix, one ListObjectsV2 request per page."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_list_client()
    bucket, _, key = path.partition("/")
    prefix = f"{key}/" if key else ""
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            resp = client.list_objects_v2(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise explain_access_error(uri, exc) from None
        for obj in resp.get("Contents", []):
            name = obj["Key"]
            rel = name[len(prefix) :]
            if name.endswith("/") or any(p.startswith(".") for p in rel.split("/")):
                continue  # folder markers and hidden names, as pyarrow's listing
            yield f"s3://{bucket}/{name}", int(obj["Size"])
        token = resp.get("NextContinuationToken")
        if not resp.get("IsTruncated") or not token:
            return
