"""A manifest: a Parquet or CSV file whose ``uri`` column lists the images.

Every row is listed, whatever its extension: a manifest is the user's explicit choice, and a URI
that is not an image ends as a failures/ row rather than vanishing. Rows come in the manifest's
own order (deterministic, and sorting a catalogue of millions would need it all in memory);
relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from semclust import storage
from semclust.embed.sources import listing_page
from semclust.errors import UserError

if TYPE_CHECKING:
    from semclust.embed.sources import InputStream

SUFFIXES = (".parquet", ".csv")


def matches(uri: str) -> bool:
    return uri.lower().endswith(SUFFIXES) and not storage.is_dir(uri)


def pages(stream: InputStream, uri: str) -> Iterator[pa.Table]:
    """Pages of at most ``stream.page_size`` URIs, in row order; empty rows count as skipped."""
    base = posixpath.dirname(storage.canonical_uri(uri))
    for batch in _uri_column(uri, stream.page_size):
        # CSV batches follow the reader's block size (1 MB); pages keep to page_size rows.
        for start in range(0, len(batch), stream.page_size):
            column = batch.slice(start, stream.page_size)
            raw = [u for u in column.to_pylist() if u]
            stream.skipped += len(column) - len(raw)
            yield listing_page([_absolute(u, base) for u in raw])


def _uri_column(manifest_uri: str, batch_rows: int) -> Iterator[pa.Array]:
    """The ``uri`` column of a Parquet or CSV manifest, batch by batch (never read whole)."""
    fs, path = storage.resolve(manifest_uri)
    if manifest_uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path) as f:
            names = pacsv.open_csv(f).schema.names
        _require_uri_column(manifest_uri, names)
        convert = pacsv.ConvertOptions(
            include_columns=["uri"], column_types={"uri": pa.string()}, strings_can_be_null=True
        )
        with fs.open_input_stream(path) as f:
            for batch in pacsv.open_csv(f, convert_options=convert):
                yield batch.column(0)
        return
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        _require_uri_column(manifest_uri, pf.schema_arrow.names)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["uri"]):
            yield batch.column(0)


def _require_uri_column(manifest_uri: str, names: list[str]) -> None:
    if "uri" not in names:
        raise UserError(f"manifest {manifest_uri!r} needs a 'uri' column; it has {names}")


def _absolute(uri: str, base: str) -> str:
    if storage.is_remote(uri) or uri.startswith("file://") or uri.startswith("/"):
        return storage.canonical_uri(uri)
    if storage.is_remote(base):  # relative to a manifest in object storage
        return posixpath.join(base, uri)
    return storage.canonical_uri(posixpath.join(base[len("file://") :], uri))
