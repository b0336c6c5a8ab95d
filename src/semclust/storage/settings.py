"""The storage settings in force (a context variable set by ``using``), the S3 clients built
from them, and the retry budget every storage call rides out transient errors with."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from semclust.config import StorageConfig
from semclust.retry import RetryPolicy, retry_call
from semclust.storage.uris import (
    _local_path,
    split_uri,
)

T = TypeVar("T")


def s3_options_from_env() -> StorageConfig:
    """The standard AWS variables AWS_ENDPOINT_URL(_S3) and AWS_REGION (AWS_PROFILE and the
    credentials are read by pyarrow's own AWS chain)."""
    return StorageConfig(
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )


def resolved(section: StorageConfig) -> StorageConfig:
    """``section`` with its unset endpoint and region taken from this process's AWS environment:
    what a worker on another node (which has only its own environment) must be told."""
    env = s3_options_from_env()
    return dataclasses.replace(
        section,
        endpoint_url=section.endpoint_url or env.endpoint_url,
        region=section.region or env.region,
    )


# The storage settings in force: set for a stage by ``using`` (the run context enters it on the
# driver, and ``RunContext.bind`` in every remote call), read by every storage call. A context
# variable, not a module setting: two runs in one process (tests, notebooks) never see each
# other's endpoint, and a function called outside any run gets the AWS environment.
_active: contextvars.ContextVar[StorageConfig | None] = contextvars.ContextVar(
    "semclust_storage", default=None
)


@contextlib.contextmanager
def using(section: StorageConfig) -> Iterator[StorageConfig]:
    """Storage calls in this block (and in threads started through ``carry``) use ``section``."""
    token = _active.set(resolved(section))
    try:
        yield _active.get() or section
    finally:
        _active.reset(token)


def activate(section: StorageConfig) -> None:
    """Set ``section`` for the rest of the current context (one made for it by the caller)."""
    _active.set(resolved(section))


def forget_clients() -> None:
    """Drop the cached S3 clients, so that changed credentials in the environment are read."""
    _s3_filesystem.cache_clear()


def options() -> StorageConfig:
    """The storage settings in force here: those of the enclosing ``using``, else the AWS
    environment."""
    return _active.get() or s3_options_from_env()


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run with the storage settings in force where ``carry`` was called, for a thread
    (a new thread starts with none): each call runs in its own copy of that context."""
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        return captured.copy().run(fn, *args, **kwargs)

    return call


def retry_policy() -> RetryPolicy:
    """How long a transient storage error is ridden out here (``storage.retry_seconds``)."""
    return RetryPolicy(seconds=options().retry_seconds)


def _retrying(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a storage call on transient errors within this process's budget (retry.py)."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(uri: str, *args: Any, **kwargs: Any) -> T:
            return retry_call(lambda: fn(uri, *args, **kwargs), retry_policy(), f"{what} {uri}")

        return call

    return wrap


def _aws_credentials(profile: str) -> tuple[str, str, str | None] | None:
    """A named profile's credentials via botocore, so profiles and SSO work as in the AWS CLI."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    creds = session.get_credentials()
    if creds is None:
        return None
    frozen = creds.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


@functools.lru_cache(maxsize=8)
def _s3_filesystem(opts: StorageConfig) -> pafs.FileSystem:
    endpoint = opts.endpoint_url
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
        return _s3_filesystem(options()), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), rest.rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


def s3_list_client(section: StorageConfig | None = None) -> Any:
    """A botocore S3 client for listing, from the same options as the pyarrow filesystem.

    Credentials come from botocore's standard chain (environment, profile, instance role), so
    none is ever passed around or printed; ``anonymous`` sends unsigned requests.
    """
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    opts = resolved(section) if section is not None else options()
    endpoint = opts.endpoint_url
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
