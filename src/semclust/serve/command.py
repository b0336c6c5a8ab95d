"""The ``semclust serve`` command line: its flags, and which storage settings reach the run."""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_parser(sub: Any) -> None:
    """Add ``serve`` to the CLI's subcommands."""
    p = sub.add_parser(
        "serve", help="search and browse a run over HTTP, with a page for people (FastAPI)"
    )
    p.add_argument("--run-dir", required=True, help="run directory with an index/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument(
        "--assignments",
        default="kmeans",
        help="the clusters shown and named: kmeans (default) or a refine head (scan, dec)",
    )
    p.add_argument("--nprobe", type=int, help="IVF lists searched (default: the index's own)")
    p.add_argument("--ef-search", type=int, help="HNSW search depth (default: the index's own)")
    p.add_argument("--device", default="auto", help="auto | cpu | gpu (default auto)")
    p.add_argument(
        "--max-upload-mb", type=float, default=32.0, help="largest request body (default 32 MiB)"
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--config", help="YAML config file: its storage section reaches the run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a storage setting, e.g. --set storage.endpoint_url=http://minio:9000",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_serve_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``semclust serve``: the storage settings to reach the run with, then ``serve``."""
    from semclust import runinfo, storage
    from semclust.config import StorageConfig, load_config
    from semclust.serve import serve

    if args.device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--device={args.device!r} is not allowed; choose auto, cpu or gpu")
    other = sorted(key for key in overrides if not key.startswith("storage."))
    if other:
        raise ValueError(f"serve takes only storage settings in --set, not {', '.join(other)}")
    given = load_config(args.config, {**overrides, "run_dir": args.run_dir}).storage
    section = given
    if not args.config and not overrides:
        # Nothing given here: reach the run's images the way the run itself did.
        with storage.using(given):
            recorded = (runinfo.load(args.run_dir).get("config") or {}).get("storage")
        if recorded:
            section = StorageConfig(**recorded)
    try:
        serve(
            args.run_dir,
            host=args.host,
            port=args.port,
            storage_config=section,
            max_upload_mb=args.max_upload_mb,
            access_log=args.access_log,
            assignments=args.assignments,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            device=args.device,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM is how a service is stopped: not an error
        return 0
    return 0
