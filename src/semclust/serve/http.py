"""HTTP plumbing of ``semclust serve``: JSON errors, the request size limit and the page's files.

Every error is JSON, ``{"error": message}``, with the status that fits: 400 a query that cannot
be used, 403 a URI outside the run's image sources, 404 an unknown id or path, 413 a body over
the limit, 422 a parameter out of range (with the framework's ``detail`` too).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from semclust.errors import UserError
from semclust.serve.catalog import BadQuery, Forbidden, NotFound

PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/app.css": ("app.css", "text/css"),
}
# The page loads nothing from elsewhere and runs no inline script.
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class TooLarge(Exception):
    """The request body passed the service's limit."""


# --- the page -------------------------------------------------------------------------------


def page_file(file_name: str, media_type: str) -> Any:
    content = resources.files("semclust.serve").joinpath("static", file_name).read_bytes()

    def serve_file() -> Response:
        headers = {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"}
        return Response(content, media_type=media_type, headers=headers)

    serve_file.__name__ = f"page_{file_name.replace('.', '_')}"
    return serve_file


# --- errors and limits ----------------------------------------------------------------------


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    statuses = (
        (NotFound, 404),
        (Forbidden, 403),
        (BadQuery, 400),
        (UserError, 400),
        (TooLarge, 413),
    )
    for exc_type, status in statuses:
        app.add_exception_handler(exc_type, _handler(status))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # FastAPI's is a subclass
        return _error(exc.status_code, str(exc.detail), path=request.url.path)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        details = json.loads(json.dumps(exc.errors(), default=str))
        return _error(422, "; ".join(problems), detail=details)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


def _handler(status: int) -> Any:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return _error(status, str(exc))

    return handle


# A client such as urllib sends its whole body before it reads the answer; closing on it
# mid-send resets the connection and it never sees the 413. Bodies up to this size are read
# and dropped first; past it, being reset is cheaper than reading on.
DRAIN_LIMIT = 64 << 20


async def _drain(receive: Any, budget: int = DRAIN_LIMIT) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, by its Content-Length or, for a
    streamed body, as soon as the bytes read pass the limit; marks every answer ``nosniff``."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or {}).get(b"content-length")
        too_large = f"the request body is over the limit of {self.limit >> 20} MiB"
        if length is not None and length.isdigit() and int(length) > self.limit:
            if int(length) <= DRAIN_LIMIT:
                await _drain(receive)
            await _error(413, too_large)(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(too_large)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # No browser may take an image or an error for a script or a page.
                headers = list(message.get("headers") or [])
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge:
            if not started:
                await _drain(receive, DRAIN_LIMIT - seen)
                await _error(413, too_large)(scope, receive, send)
