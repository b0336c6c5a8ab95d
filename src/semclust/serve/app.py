"""The HTTP side of ``semclust serve``: a FastAPI app over a loaded :class:`RunCatalog`.

Every answer is JSON except the images and the page; every error is JSON too,
``{"error": message}`` with the status that fits (400 a query that cannot be used, 403 a URI
outside the run's image sources, 404 an unknown id, 413 a body over the limit, 422 a parameter
out of range). Handlers that compute (decode, embed, search) are plain functions, which the
framework runs in its thread pool, so one slow upload does not hold the others.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from semclust.serve.catalog import BadQuery, RunCatalog
from semclust.serve.http import PAGE_FILES, BodyLimit, add_error_handlers, page_file
from semclust.serve.queries import QueryEngine

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_QUERIES = 64  # queries in one POST /search
MAX_PAGE = 500
THUMB_SIZES = (16, 1024)  # the ?size= range of GET /images/{id}
_THUMB_CACHE = 4096  # thumbnails kept in memory (about 10 KB each at 256 px)
# Formats a browser shows as they are; anything else is re-encoded before it is sent.
_BROWSER_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}


class NameBody(BaseModel):
    name: str = Field(description="the cluster's name (one line, at most 200 characters)")


_QUERY_SCHEMA = {
    "type": "object",
    "description": "exactly one of image_id, uri or vector",
    "properties": {
        "image_id": {"type": "integer", "description": "an image of this run"},
        "uri": {
            "type": "string",
            "description": "an image of this run, or one inside the "
            "folder or prefix its images came from",
        },
        "vector": {"type": "array", "items": {"type": "number"}, "description": "an embedding"},
    },
}
_FILTERS = {
    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
    "cluster": {"type": "integer", "description": "only images of this cluster"},
    "label": {"type": "string", "description": "only images with this label"},
}
_SEARCH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "queries": {"type": "array", "items": _QUERY_SCHEMA, "maxItems": MAX_QUERIES},
                    **_QUERY_SCHEMA["properties"],
                    **_FILTERS,
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    **_FILTERS,
                },
                "required": ["image"],
            }
        },
    },
}


def create_app(catalog: RunCatalog, *, max_upload_bytes: int = 32 << 20) -> FastAPI:
    """The service's app over ``catalog``; bodies over ``max_upload_bytes`` are refused (413)."""
    app = FastAPI(
        title="semclust serve",
        description=f"Search and browse the run {catalog.run_dir}.",
        version="1",
    )
    engine = QueryEngine(catalog)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    for route, (file_name, media_type) in PAGE_FILES.items():
        app.add_api_route(
            route, page_file(file_name, media_type), methods=["GET"], include_in_schema=False
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        """The run being served and what it holds."""
        return {**catalog.health(), "model_loaded": engine.embedder_ready}

    _add_search_route(app, engine)
    _add_cluster_routes(app, catalog)
    _add_image_routes(app, catalog)
    return app


def _add_search_route(app: FastAPI, engine: QueryEngine) -> None:
    @app.post("/search", openapi_extra={"requestBody": _SEARCH_BODY})
    async def search(request: Request) -> dict[str, Any]:
        """Nearest images to uploaded images (multipart ``image`` files) or to JSON queries by
        ``image_id``, ``uri`` or ``vector`` (one, or a list in ``queries``)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=MAX_QUERIES, max_fields=16)
            uploads = form.getlist("image")
            files = [u for u in uploads if hasattr(u, "read")]
            if not files or len(files) != len(uploads):
                raise BadQuery("a multipart search needs one or more files in the 'image' field")
            images = [await f.read() for f in files]
            names = [f"upload {f.filename!r}" if f.filename else "the upload" for f in files]
            params = _filters({key: form.get(key) for key in _FILTERS})
            return await run_in_threadpool(_search_uploads, engine, images, names, params)
        if kind == "application/json":
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadQuery(f"the body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise BadQuery("the JSON body must be an object")
            queries = body.get("queries")
            if queries is None:
                queries = [{key: body[key] for key in _QUERY_SCHEMA["properties"] if key in body}]
            if not isinstance(queries, list) or not queries or len(queries) > MAX_QUERIES:
                raise BadQuery(f"'queries' must be a list of 1 to {MAX_QUERIES} queries")
            params = _filters({key: body.get(key) for key in _FILTERS})
            return await run_in_threadpool(_search_json, engine, queries, params)
        raise BadQuery(
            "POST /search takes multipart/form-data (image files) or application/json "
            f"(queries by image_id, uri or vector), not {kind or 'an untyped body'!r}"
        )


def _add_cluster_routes(app: FastAPI, catalog: RunCatalog) -> None:
    @app.get("/clusters")
    def clusters(
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        sort: str = Query("size", pattern="^(id|size|cohesion|mean_distance|name|label)$"),
        order: str = Query("desc", pattern="^(asc|desc)$"),
    ) -> dict[str, Any]:
        """The clusters with size, cohesion (mean cosine to the centroid on a spherical run,
        else the mean squared distance), a person's name and the majority label, paged."""
        ranked = catalog.clusters(sort, order == "desc")
        page = ranked[offset : offset + limit]
        return {
            "total": len(ranked),
            "offset": offset,
            "limit": limit,
            "sort": sort,
            "order": order,
            "cohesion_name": catalog.cohesion_name,
            "clusters": [
                {**s.__dict__, "preview": [m["image_ref"] for m in catalog.members(s.id, 0, 4)]}
                for s in page
            ],
        }

    @app.get("/clusters/{cluster_id}")
    def cluster(
        cluster_id: int, offset: int = Query(0, ge=0), limit: int = Query(60, ge=1, le=MAX_PAGE)
    ) -> dict[str, Any]:
        """One cluster and a page of its members, nearest its centroid first."""
        stats = catalog.cluster_stats(cluster_id)
        return {
            **stats.__dict__,
            "cohesion_name": catalog.cohesion_name,
            "offset": offset,
            "limit": limit,
            "members": catalog.members(cluster_id, offset, limit),
        }

    @app.put("/clusters/{cluster_id}/name")
    def name_cluster(cluster_id: int, body: NameBody) -> dict[str, Any]:
        """Name a cluster; every name is kept in the run directory's names.yaml."""
        catalog.set_name(cluster_id, body.name)
        return _names_answer(catalog, cluster_id)

    @app.delete("/clusters/{cluster_id}/name")
    def unname_cluster(cluster_id: int) -> dict[str, Any]:
        """Remove a cluster's name."""
        catalog.set_name(cluster_id, None)
        return _names_answer(catalog, cluster_id)


def _add_image_routes(app: FastAPI, catalog: RunCatalog) -> None:
    thumbs = _ThumbCache(_THUMB_CACHE)

    @app.get("/images/{image_id}", response_class=Response)
    def image(
        image_id: int,
        size: int | None = Query(None, ge=THUMB_SIZES[0], le=THUMB_SIZES[1]),
    ) -> Response:
        """The image (re-encoded as JPEG if a browser cannot show its format), or with
        ``size`` a JPEG thumbnail fitted in size x size pixels."""
        headers = {"Cache-Control": "private, max-age=3600"}
        if size is not None:
            data = thumbs.get(catalog, image_id, size)
            return Response(data, media_type="image/jpeg", headers=headers)
        data = catalog.image_bytes(image_id)
        media_type = _browser_type(data)
        if media_type is None:
            data, media_type = _thumbnail(catalog, data, THUMB_SIZES[1], image_id), "image/jpeg"
        return Response(data, media_type=media_type, headers=headers)

    @app.get("/images/{image_id}/neighbors")
    def neighbors(image_id: int, k: int | None = Query(None, ge=1, le=MAX_K)) -> dict[str, Any]:
        """The image's nearest neighbours in the run's kNN graph (knn/), nearest first."""
        row = catalog.row_of(image_id)
        (image,) = catalog.describe_rows(np.array([row]))
        return {"image": image, "neighbors": catalog.neighbors(image_id, k)}


# --- search ---------------------------------------------------------------------------------


def _filters(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"k": 10, "cluster": None, "label": None}
    k, cluster, label = raw.get("k"), raw.get("cluster"), raw.get("label")
    if k not in (None, ""):
        out["k"] = _integer("k", k)
        if not 1 <= out["k"] <= MAX_K:
            raise BadQuery(f"k must be between 1 and {MAX_K}, got {out['k']}")
    if cluster not in (None, ""):
        out["cluster"] = _integer("cluster", cluster)
    if label not in (None, ""):
        if not isinstance(label, str):
            raise BadQuery("label must be a string")
        out["label"] = label
    return out


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise BadQuery(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadQuery(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise BadQuery(f"{name} must be an integer, got {value!r}")
    return number


def _search_uploads(
    engine: QueryEngine, images: list[bytes], names: list[str], params: dict[str, Any]
) -> dict[str, Any]:
    for data, name in zip(images, names, strict=True):
        if not data:
            raise BadQuery(f"{name} is empty")
    vectors = engine.embed_images(images, names)
    hits = engine.search(vectors, params["k"], cluster=params["cluster"], label=params["label"])
    return _answer(params, [{"upload": n} for n in names], hits)


def _search_json(engine: QueryEngine, queries: list[Any], params: dict[str, Any]) -> dict[str, Any]:
    vectors = []
    for i, q in enumerate(queries):
        given = [key for key in ("image_id", "uri", "vector") if isinstance(q, dict) and key in q]
        if len(given) != 1:
            raise BadQuery(f"query {i} needs exactly one of image_id, uri or vector")
        value = q[given[0]]
        if given[0] == "image_id":
            vectors.append(engine.vectors_of_ids([_integer("image_id", value)])[0])
        elif given[0] == "uri":
            if not isinstance(value, str) or not value:
                raise BadQuery(f"query {i}: uri must be a non-empty string")
            vectors.append(engine.vector_of_uri(value))
        else:
            if not isinstance(value, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
            ):
                raise BadQuery(f"query {i}: vector must be a list of numbers")
            vectors.append(np.asarray(value, dtype=np.float32))
    dims = {len(v) for v in vectors}
    if len(dims) > 1:
        raise BadQuery(f"query vectors have different lengths: {sorted(dims)}")
    hits = engine.search(
        np.stack(vectors), params["k"], cluster=params["cluster"], label=params["label"]
    )
    described = [{key: q[key] for key in q if key != "vector"} or {"vector": True} for q in queries]
    return _answer(params, described, hits)


def _answer(params: dict[str, Any], queries: list[Any], hits: list[Any]) -> dict[str, Any]:
    return {
        **params,
        "results": [{"query": q, "hits": h} for q, h in zip(queries, hits, strict=True)],
    }


def _names_answer(catalog: RunCatalog, cluster_id: int) -> dict[str, Any]:
    return {
        "id": cluster_id,
        "name": catalog.names.get(cluster_id),
        "names": {str(c): n for c, n in sorted(catalog.names.items())},
        "names_file": catalog.names_uri,
        "label_command": (
            f"semclust label --run-dir {catalog.run_dir} --names {catalog.names_uri}"
            + (f" --assignments {catalog.assignments}" if catalog.assignments != "kmeans" else "")
        ),
    }


# --- images ---------------------------------------------------------------------------------


def _browser_type(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _BROWSER_FORMATS.get(im.format or "")
    except Exception:  # not an image Pillow knows: re-encoding reports it
        return None


def _thumbnail(catalog: RunCatalog, data: bytes, size: int, image_id: int) -> bytes:
    from semclust.embed.decode import ImageDecodeError
    from semclust.report.thumbs import make_thumbnail

    try:
        return make_thumbnail(data, size, max_pixels=catalog.max_pixels)
    except ImageDecodeError as exc:
        raise BadQuery(f"image {image_id} cannot be shown: {exc}") from None


class _ThumbCache:
    """The last few thousand thumbnails, by (image id, size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, catalog: RunCatalog, image_id: int, size: int) -> bytes:
        key = (image_id, size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = _thumbnail(catalog, catalog.image_bytes(image_id), size, image_id)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data
