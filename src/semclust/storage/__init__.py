"""URIs -> filesystems, and the few file operations the stages need.

Every stage addresses data by URI: a local path, ``file://...`` or ``s3://bucket/key``. Local
writes go to a temporary name and are renamed when whole; an S3 PUT is atomic by itself, so a
reader never sees half a shard on either.

The package: ``uris`` (splitting, joins, ids), ``settings`` (the settings in force, S3 clients,
retries), ``access`` (checks and messages), ``files`` (reads, writes), ``listing`` (paged listing).
"""

from semclust.storage.access import _BUCKET_CHECKS as _BUCKET_CHECKS
from semclust.storage.access import (
    bucket_reachable,
    check_access,
    explain_access_error,
    redact,
)
from semclust.storage.files import (
    cache_root,
    exists,
    is_dir,
    local_copy,
    makedirs,
    parquet_num_rows,
    read_bytes,
    read_json,
    read_parquet,
    remove_tree,
    upload_file,
    write_bytes,
    write_json,
    write_parquet,
)
from semclust.storage.listing import (
    LIST_PAGE_SIZE,
    iter_file_pages,
    list_files,
    list_shards,
)
from semclust.storage.settings import (
    activate,
    carry,
    forget_clients,
    options,
    resolve,
    resolved,
    retry_policy,
    s3_list_client,
    s3_options_from_env,
    using,
)
from semclust.storage.uris import (
    REMOTE_SCHEMES,
    canonical_uri,
    image_id_for,
    is_remote,
    join,
    split_uri,
)

__all__ = [
    "LIST_PAGE_SIZE",
    "REMOTE_SCHEMES",
    "activate",
    "bucket_reachable",
    "cache_root",
    "canonical_uri",
    "carry",
    "check_access",
    "exists",
    "explain_access_error",
    "forget_clients",
    "image_id_for",
    "is_dir",
    "is_remote",
    "iter_file_pages",
    "join",
    "list_files",
    "list_shards",
    "local_copy",
    "makedirs",
    "options",
    "parquet_num_rows",
    "read_bytes",
    "read_json",
    "read_parquet",
    "redact",
    "remove_tree",
    "resolve",
    "resolved",
    "retry_policy",
    "s3_list_client",
    "s3_options_from_env",
    "split_uri",
    "upload_file",
    "using",
    "write_bytes",
    "write_json",
    "write_parquet",
]
