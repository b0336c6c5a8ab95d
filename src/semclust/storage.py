"""URIs -> filesystems, and the few file operations the stages need.

Every stage addresses data by URI: a local path, ``file://...`` or ``s3://bucket/key``. Local
writes go to a temporary name and are renamed when whole; an S3 PUT is atomic by itself, so a
reader never sees half a shard on either.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from semclust.errors import StoreUnavailable
from semclust.retry import RetryPolicy, is_transient_request, retry_call

_ID_MASK = (1 << 63) - 1
T = TypeVar("T")


def image_id_for(uri: str) -> int:
    """Stable 63-bit id of a URI (BLAKE2b): equal across runs and machines, a valid FAISS id."""
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _ID_MASK


# --- URIs -----------------------------------------------------------------------------------
#
# The URI form written to a run directory: ``file://`` + the absolute local path, and
# ``s3://bucket/`` (or ``gs://bucket/``) + the object key, both raw: never percent-encoded or
# -decoded, so every byte a filesystem or a key allows (``#``, ``?``, ``%``, ``+``, spaces,
# unicode, a literal ``%20``) round-trips and ``image_id_for`` hashes exactly the name. URIs are
# therefore split by hand at the scheme's ``://``, never with urllib, which would take ``#`` for a
# fragment, ``?`` for a query and ``:`` in a file name for a scheme.

REMOTE_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def split_uri(uri: str) -> tuple[str, str]:
    """(lower-case scheme, the rest after ``://``), or ``("", uri)`` for a plain local path.

    Only a leading ``<letters>://`` is a scheme: a local name such as ``photo:1.jpg`` or
    ``a#b?.jpg`` stays a path.
    """
    m = _SCHEME.match(uri)
    if m is None:
        return "", uri
    return m.group(1).lower(), uri[m.end() :]


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] in REMOTE_SCHEMES


def _local_path(path_or_uri: str) -> str:
    """The absolute, symlink-resolved local path of a local path or ``file://`` URI."""
    scheme, rest = split_uri(path_or_uri)
    if scheme == "file":
        if rest.startswith("localhost/"):  # file://localhost/abs is file:///abs (RFC 8089)
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(
                f"file URI {path_or_uri!r} names a host or a relative path; write "
                "file:///absolute/path (raw, not percent-encoded) or a plain path"
            )
        path = rest
    elif scheme:
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {path_or_uri!r}; use a local path, "
            "file://, or s3://"
        )
    elif path_or_uri[:6].lower() == "file:/":  # file:/abs, RFC 8089's form without authority
        path = path_or_uri[5:]
    else:
        path = os.path.expanduser(path_or_uri)
    # os.path.realpath is what Path.resolve() did (same result, so the same image ids), except
    # that a symlink loop comes back as the path itself instead of raising RuntimeError: the read
    # then fails with ELOOP, which is that image's failure row.
    return os.path.realpath(path)


def canonical_uri(path_or_uri: str) -> str:
    """``file:///abs/path`` for local paths (symlinks resolved), the URI itself for object storage
    (without a trailing ``/``). Nothing is percent-decoded: ``a%20b`` names a file ``a%20b``."""
    if is_remote(path_or_uri):
        return path_or_uri.rstrip("/") if path_or_uri.endswith("/") else path_or_uri
    return "file://" + _local_path(path_or_uri)


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 or an S3-compatible store. Credentials are never part of it: they come
    from the standard AWS chain (environment, shared profile files, instance identity)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for a local store
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False
    retry_seconds: float = 120.0  # budget for a transient error, per read or write (retry.py)
    max_attempts: int = 5  # the client's own tries inside each of ours


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
        retry_seconds=float(section.retry_seconds),
        max_attempts=int(section.max_attempts),
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


def retry_policy() -> RetryPolicy:
    """How long this process rides out a transient storage error (``storage.retry_seconds``)."""
    return RetryPolicy(seconds=_s3_options.retry_seconds)


def _retrying(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a storage call on transient errors within this process's budget (retry.py)."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(uri: str, *args: Any, **kwargs: Any) -> T:
            return retry_call(lambda: fn(uri, *args, **kwargs), retry_policy(), f"{what} {uri}")

        return call

    return wrap


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
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts)
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
    """The pyarrow filesystem and the path inside it for a URI or local path.

    For object storage the path is ``bucket/key``, the key taken raw from the URI.
    """
    scheme, rest = split_uri(uri)
    if scheme == "s3":
        return _s3_filesystem(), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), rest.rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


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


_BUCKET_CHECKS: dict[str, tuple[float, bool]] = {}  # bucket -> (when, reachable)


def bucket_reachable(uri: str, max_age: float = 10.0) -> bool:
    """Whether this process's credentials can still reach the bucket of ``uri`` (answers are
    kept ``max_age`` seconds): after a 403 on an object, it tells a denied object (the bucket
    answers) from wrong or expired credentials (it does not)."""
    import time

    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    now = time.monotonic()
    cached = _BUCKET_CHECKS.get(bucket)
    if cached is not None and now - cached[0] < max_age:
        return cached[1]
    try:
        reachable = fs.get_file_info(bucket).type == pafs.FileType.Directory
    except OSError:
        reachable = False
    _BUCKET_CHECKS[bucket] = (now, reachable)
    return reachable


def join(base: str, *parts: str) -> str:
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


@_retrying("check")
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_retrying("check")
def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_retrying("create")
def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


@_retrying("read")
def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def _temporary(path: str) -> Iterator[str]:
    """A temporary name beside ``path``, removed if the write fails (a full disk keeps no
    half-written file)."""
    tmp = _tmp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@_retrying("write")
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old file or the new one."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with _temporary(path) as tmp:
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


@_retrying("write")
def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Parquet shard atomically (temporary name + rename locally; one PUT on S3)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with _temporary(path) as tmp:
            pq.write_table(table, tmp, filesystem=fs)
            os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


@_retrying("read")
def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


@_retrying("read")
def parquet_num_rows(uri: str) -> int:
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def list_files(uri: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(URI, size) of every file under a folder/prefix, hidden names (``.x``) skipped.

    A local tree is walked as ``iter_file_pages`` walks it (symlinks followed, loops cut,
    broken entries listed with size -1; see ``_walk_sorted``), in sorted order.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        yield _to_uri(uri, info.path), info.size
        return
    if isinstance(fs, pafs.LocalFileSystem):
        # pyarrow's own recursive listing follows directory symlinks without cutting loops and
        # fails on a name that is not UTF-8: the walk handles both.
        for entry_path, size in _walk_sorted(path, recursive=recursive):
            yield "file://" + entry_path, size
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
    """The URI of a path that the filesystem of ``base_uri`` returned (raw, as everywhere)."""
    scheme = split_uri(base_uri)[0]
    if scheme in REMOTE_SCHEMES:
        return f"{scheme}://{fs_path}"
    return "file://" + fs_path


@_retrying("list")
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


@_retrying("remove")
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
    config: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": opts.max_attempts}}
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
    which is the order of Python strings), a local tree is walked one directory at a time
    (``_walk_sorted``: symlinks, loops and broken entries). A single directory's entries are held
    while it is walked (the OS returns them unsorted); gs:// falls back to pyarrow's full
    listing. Pages may be shorter than ``page_size``.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    fs, path = resolve(uri)
    scheme = split_uri(uri)[0]
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


def _walk_sorted(root: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(path, size) of files under ``root`` in the order of their sorted full paths.

    A directory sorts by ``name + "/"``: every path below it starts with that, so walking
    entries in this order gives exactly the global string order, one directory at a time.

    Folders as users have them:

    - A symlink to a file is listed under its own name (a folder of links into an image pool is
      a common way to build a dataset).
    - A directory symlink is followed, but each real directory (``st_dev``, ``st_ino``) is
      walked at most once, so loops end and two links to one directory list it once (under the
      link that sorts first). A link to a directory inside the root (not under a hidden name)
      is not followed: the plain walk lists its files once, at their real paths.
    - An entry that cannot be stat'ed (a dangling link, a link loop) is listed with size -1, and
      a directory that cannot be scanned is listed as ``path + "/"`` with size -1: reading either
      fails, so it becomes a failure row instead of vanishing or ending the listing.
    - FIFOs, sockets and devices are not files and are skipped (opening a FIFO blocks a reader).
    - A name that is not UTF-8 cannot be a URI (run directories store URIs as UTF-8 text): it is
      listed with its bad bytes as ``\\xNN`` escapes, which names no file, so it fails at read.
    """
    root_real = os.path.realpath(root)
    top = os.stat(root)
    visited = {(top.st_dev, top.st_ino)}
    yield from _walk_entries(_scan_dir(root), root_real, visited, recursive)


# A directory entry: (sort key, path, size, (st_dev, st_ino) for a directory else None, is_link).
_Entry = tuple[str, str, int, tuple[int, int] | None, bool]


def _scan_dir(path: str) -> list[_Entry]:
    """The visible entries of one directory, sorted; raises OSError if it cannot be scanned.

    The sort key is the name as it will appear in the URI (``_text_path``), so that the URIs
    come out sorted even where a name had to be escaped.
    """
    entries: list[_Entry] = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            key = _text_path(entry.name)
            try:
                st = entry.stat()  # follows symlinks
            except OSError:  # dangling link, link loop, no search permission
                entries.append((key, entry.path, -1, None, True))
                continue
            if stat.S_ISDIR(st.st_mode):
                dir_id = (st.st_dev, st.st_ino)
                entries.append((key + "/", entry.path, -1, dir_id, entry.is_symlink()))
            elif stat.S_ISREG(st.st_mode):
                entries.append((key, entry.path, st.st_size, None, False))
    entries.sort()
    return entries


def _walk_entries(
    entries: list[_Entry], root_real: str, visited: set[tuple[int, int]], recursive: bool
) -> Iterator[tuple[str, int]]:
    for _, entry_path, size, dir_id, is_link in entries:
        if dir_id is None:
            yield _text_path(entry_path), size
            continue
        if not recursive or dir_id in visited:
            continue  # a loop, or a second way to a directory already walked
        if is_link and _visible_inside(os.path.realpath(entry_path), root_real):
            continue  # walked (or to be walked) at its real path
        visited.add(dir_id)
        try:
            sub = _scan_dir(entry_path)
        except OSError:
            yield _text_path(entry_path) + "/", -1
            continue
        yield from _walk_entries(sub, root_real, visited, recursive)


def _visible_inside(real: str, root_real: str) -> bool:
    """Whether the real path ``real`` is the root or below it with no hidden component (so the
    plain walk from the root reaches it)."""
    if real == root_real:
        return True
    prefix = root_real.rstrip("/") + "/"
    if not real.startswith(prefix):
        return False
    return not any(part.startswith(".") for part in real[len(prefix) :].split("/"))


def _text_path(path: str) -> str:
    """``path`` as UTF-8-clean text: undecodable bytes (surrogate escapes) become ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


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
            resp = retry_call(
                lambda kw=kwargs: client.list_objects_v2(**kw),
                retry_policy(),
                f"list {uri}",
                transient=is_transient_request,
            )
        except (BotoCoreError, ClientError) as exc:
            if is_transient_request(exc):
                raise StoreUnavailable(
                    f"cannot list {uri}: the store was unreachable for longer than "
                    f"storage.retry_seconds={retry_policy().seconds:g} s ({redact(str(exc))}); "
                    "nothing was lost: run again (--mode resume) once it is back"
                ) from None
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
