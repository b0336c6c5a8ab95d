"""``semclust serve``: a run's index, clusters and kNN graph over HTTP, with a page to browse them.

FastAPI on uvicorn, one process: the index, the id map and the per-image tables are loaded once
(:mod:`semclust.serve.catalog`), the model on the first query that needs it; the routes are in
:mod:`semclust.serve.app`, the page in ``static/``.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from semclust.config import StorageConfig
from semclust.errors import UserError

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError that says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port "
            "(or --port 0 for any free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    run_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    storage_config: StorageConfig | None = None,
    max_upload_mb: float = 32.0,
    access_log: bool = False,
    **catalog_options: Any,
) -> None:
    """Load ``run_dir`` and answer on host:port until Ctrl-C or SIGTERM."""
    import uvicorn

    from semclust.serve.app import create_app
    from semclust.serve.catalog import RunCatalog

    if max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    sock = bind(host, port)  # before loading: a port in use fails in a second, not after a load
    try:
        catalog = RunCatalog(run_dir, storage_config=storage_config, **catalog_options)
        app = create_app(catalog, max_upload_bytes=int(max_upload_mb * (1 << 20)))
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(
            f"semclust serve: {catalog.n} images, {catalog.k} clusters of {run_dir}\n"
            f"  open http://{shown}:{bound_port}/ (API schema: /docs); Ctrl-C stops",
            flush=True,
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "serving on %s: anyone who reaches this address can read the run's images and "
                "name its clusters (there is no login); put it behind your own proxy",
                host,
            )
        config = uvicorn.Config(
            app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=5
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    print("semclust serve: stopped", file=sys.stderr, flush=True)
