"""The pages' frame and building blocks: inline CSS, the header, tables, escaping, numbers.

Every string that comes from the data (file names, URIs, labels, error messages, JSON keys) goes
through :func:`esc`; links are built from numbers and hex ids only. Nothing is loaded from outside
the report folder, so it works opened from disk, offline, or served from object storage.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from semclust.report.views import ReportView, page_name


def esc(value: object) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A value as short text: thousands separators, 4 significant digits, '-' for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


_CSS = """
:root{--fg:#1d2330;--mute:#5d6677;--line:#d9dde5;--bg:#f6f7f9;--card:#fff;--accent:#2357c6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header.top{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;
align-items:center;flex-wrap:wrap}
header.top a{color:#cfd8ff;text-decoration:none}header.top a.on{color:#fff;font-weight:600}
header.top .brand{font-weight:700}
main{padding:16px 20px;max-width:1400px;margin:0 auto}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:17px;margin:22px 0 8px}
h3{font-size:14px;margin:12px 0 6px;color:var(--mute)}
.muted{color:var(--mute)}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px 14px;
min-width:120px}.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:var(--card);margin:6px 0}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
th[data-key]{cursor:pointer;user-select:none}th[data-key]:after{content:" \\2195";color:#999}
td.err{max-width:700px;word-break:break-word}td.uri{max-width:520px;word-break:break-all}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:middle;
margin-right:4px;border:1px solid rgba(0,0,0,.2)}
section.cluster{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:10px 14px;margin:14px 0}
section.cluster h2{margin:4px 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}
dl.facts dt{color:var(--mute)}dl.facts dd{margin:0}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:150px}
figure.thumb img{width:150px;height:130px;object-fit:contain;background:#e9ebef;border-radius:4px;
display:block}
figure.thumb figcaption{font-size:11px;color:var(--mute);word-break:break-all;
max-height:3.9em;overflow:hidden}
.nothumb{width:150px;height:130px;background:#f3e1e1;color:#7a2d2d;font-size:11px;padding:6px;
border-radius:4px;overflow:hidden;word-break:break-word}
nav.pager{margin:10px 0;display:flex;flex-wrap:wrap;gap:4px;align-items:center}
nav.pager a,nav.pager span{padding:2px 8px;border:1px solid var(--line);border-radius:4px;
background:var(--card);text-decoration:none;color:var(--accent)}
nav.pager span.cur{background:var(--accent);color:#fff}
.map{position:relative;display:inline-block;max-width:100%}
.map img{max-width:100%;height:auto;border:1px solid var(--line);background:#fff;display:block}
.map a{position:absolute;transform:translate(-50%,-50%);min-width:26px;min-height:20px;
color:transparent;font-size:12px}
.map a:hover{outline:2px solid var(--accent)}
.row{display:flex;flex-wrap:wrap;gap:24px}
.ctl{margin:6px 0;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
""".strip()

_NAV = (
    ("index.html", "Overview"),
    (page_name(1), "Clusters"),
    ("duplicates.html", "Near-duplicates"),
    ("failures.html", "Failures"),
)


def frame(view: ReportView, title: str, active: str, body: str, script: str = "") -> str:
    links = " ".join(
        f'<a href="{href}"{" class=on" if href == active else ""}>{esc(name)}</a>'
        for href, name in _NAV
    )
    tail = f"<script>\n{script}\n</script>\n" if script else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width,initial-scale=1">\n'
        # An inline empty icon: browsers would otherwise ask the server for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)} · semclust report · {esc(view.run_name)}</title>\n"
        f"<style>\n{_CSS}\n</style></head>\n<body>\n"
        f'<header class="top"><span class="brand">semclust report</span>'
        f"<span>{esc(view.run_name)}</span>{links}</header>\n"
        f"<main>\n{body}\n</main>\n{tail}</body></html>\n"
    )


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    numeric: Sequence[bool] | None = None,
    attrs: str = "",
) -> str:
    """A table of escaped cells (values formatted with :func:`fmt`)."""
    numeric = numeric or [False] * len(headers)
    head = "".join(
        f"<th{' class=n' if numeric[i] else ''}>{esc(h)}</th>" for i, h in enumerate(headers)
    )
    body = "\n".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if numeric[i] else ''}>{esc(fmt(v))}</td>" for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def json_block(obj: Any) -> str:
    """Any JSON value as tables: a list of records or a record of records as one table."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        keys: list[str] = []
        for row in obj:
            keys += [str(k) for k in row if str(k) not in keys]
        rows = [[_cell(row.get(k)) for k in keys] for row in obj]
        return table(keys, rows, [_is_num(obj, k) for k in keys])
    if isinstance(obj, dict):
        nested = {k: v for k, v in obj.items() if isinstance(v, (dict, list))}
        scalars = {k: v for k, v in obj.items() if k not in nested}
        parts = []
        inner = [v for v in nested.values() if isinstance(v, dict)]
        if (
            nested
            and len(inner) == len(nested)
            and all(not isinstance(x, (dict, list)) for v in inner for x in v.values())
        ):
            # e.g. {"kmeans": {"acc": .., "nmi": ..}, "scan": {...}}: one row per key.
            cols: list[str] = []
            for v in inner:
                cols += [str(k) for k in v if str(k) not in cols]
            rows = [[k, *[v.get(c) for c in cols]] for k, v in nested.items()]
            parts.append(table(["", *cols], rows, [False, *[True] * len(cols)]))
            nested = {}
        if scalars:
            parts.append(table(["key", "value"], [(k, _cell(v)) for k, v in scalars.items()]))
        for k, v in nested.items():
            parts.append(f"<h3>{esc(k)}</h3>{json_block(v)}")
        return "\n".join(parts)
    if isinstance(obj, list):
        return f"<p>{esc(', '.join(fmt(_cell(x)) for x in obj))}</p>"
    return f"<p>{esc(fmt(obj))}</p>"


def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        import json

        return json.dumps(v, sort_keys=True, default=str)
    return v


def _is_num(rows: list[dict[str, Any]], key: str) -> bool:
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
