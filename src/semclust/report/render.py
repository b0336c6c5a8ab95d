"""HTML of the report: static pages with inline CSS and a little inline JS, relative links only.

Every string that comes from the data (file names, URIs, labels, error messages, JSON keys) goes
through :func:`esc`; links are built from numbers and hex ids only. Nothing is loaded from outside
the report folder, so it works opened from disk, offline, or served from object storage.
"""

from __future__ import annotations

import html
import math
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from semclust.report.collect import (
    ClusterLabel,
    DuplicateSummary,
    FailureSummary,
    LabelSummary,
    Member,
)
from semclust.report.map2d import color_hex
from semclust.report.paths import PathDisplay
from semclust.report.thumbs import thumb_size


def esc(value: object) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def page_name(page: int) -> str:
    """File name of the 1-based cluster page ``page``."""
    return f"clusters-{page:04d}.html"


@dataclass
class ClusterView:
    cluster: int
    size: int
    mean_distance: float | None  # mean squared L2 to the centroid; None for an empty cluster
    share: float  # the cluster's share of the k-means objective (sum of distances)
    neighbours: list[tuple[int, float]]  # (cluster, centroid cosine), most similar first
    nearest: list[Member] = field(default_factory=list)
    sample: list[Member] = field(default_factory=list)
    label: ClusterLabel | None = None
    rank: int = 0  # 1-based review order
    page: int = 1

    def anchor(self) -> str:
        return f"c{self.cluster}"

    def href(self) -> str:
        return f"{page_name(self.page)}#{self.anchor()}"


@dataclass
class MapView:
    src: str  # relative path of the PNG
    method: str
    points: int
    width: int
    height: int
    labels: dict[int, tuple[float, float]]  # cluster -> (x, y) as fractions of the picture


@dataclass
class ReportView:
    """Everything the pages show; built by :mod:`semclust.report.build`."""

    run_name: str
    generated: str
    version: str
    display: PathDisplay
    spherical: bool
    counts: list[tuple[str, str]]
    stages: list[dict[str, Any]]
    config_rows: list[tuple[str, str]]
    metrics: Any
    k_selection: Any
    clusters: list[ClusterView]  # in review order
    pages: int
    thumbs: dict[int, tuple[str | None, str]]  # image_id -> (relative path or None, error)
    thumb_box: int
    failures: FailureSummary
    duplicates: DuplicateSummary | None
    labels: LabelSummary | None
    map: MapView | None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def by_id(self) -> dict[int, ClusterView]:
        return {c.cluster: c for c in self.clusters}

    @cached_property
    def total_images(self) -> int:
        return sum(c.size for c in self.clusters)


# --- formatting --------------------------------------------------------------------------------


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


def cohesion_text(view: ReportView, mean_distance: float | None) -> str:
    if mean_distance is None:
        return "-"
    if view.spherical:
        # Rows and centroids are unit vectors: squared L2 = 2 - 2 cos.
        return f"{1.0 - mean_distance / 2.0:.3f}"
    return f"{mean_distance:.4g}"


def cohesion_name(view: ReportView) -> str:
    return "mean cosine to centroid" if view.spherical else "mean squared distance to centroid"


def member_score(view: ReportView, m: Member) -> str:
    if m.distance is None:
        return ""
    if view.spherical:
        return f"cos {1.0 - m.distance / 2.0:.3f}"
    return f"d² {m.distance:.4g}"


# --- page frame --------------------------------------------------------------------------------

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


# --- galleries ---------------------------------------------------------------------------------


def figure(view: ReportView, m: Member, prefix: str = "") -> str:
    caption = view.display.uri(m.uri) if m.uri else str(m.image_id)
    name = posixpath.basename(caption) or caption
    lines = [esc(name)]
    score = member_score(view, m)
    if score:
        lines.append(esc(score))
    if m.label is not None:
        conf = f" {m.confidence:.2f}" if m.confidence is not None else ""
        lines.append(f"<b>{esc(m.label)}</b>{esc(conf)}")
    title = view.display.full(m.uri) if m.uri else str(m.image_id)
    rel, error = view.thumbs.get(m.image_id, (None, "no thumbnail was made"))
    if rel is None:
        pic = (
            f'<div class="nothumb" title="{esc(title)}">no thumbnail: '
            f"{esc(view.display.text(error))}</div>"
        )
    else:
        w, h = thumb_size(m.width, m.height, view.thumb_box)
        pic = (
            f'<img class="thumb" loading="lazy" decoding="async" src="{prefix}{rel}" '
            f'width="{w}" height="{h}" alt="{esc(caption)}" title="{esc(title)}">'
        )
    return (
        f'<figure class="thumb" data-id="{m.image_id}">{pic}'
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def gallery(view: ReportView, members: Sequence[Member], kind: str) -> str:
    figures = "".join(figure(view, m) for m in members)
    return f'<div class="grid" data-kind="{kind}">{figures}</div>'


def cluster_link(view: ReportView, cluster: int) -> str:
    cv = view.by_id.get(cluster)
    swatch = f'<span class="swatch" style="background:{color_hex(cluster)}"></span>'
    if cv is None:
        return f"{swatch}{cluster}"
    return f'<a href="{cv.href()}">{swatch}{cluster}</a>'


def label_text(label: ClusterLabel | None) -> str:
    if label is None:
        return "-"
    conf = f", confidence {label.confidence:.2f}" if label.confidence is not None else ""
    src = f", source {label.source}" if label.source else ""
    return f"{label.label} ({label.share:.0%} of {label.labelled:,} labelled{conf}{src})"


def cluster_section(view: ReportView, cv: ClusterView) -> str:
    total = max(view.total_images, 1)
    neighbours = ", ".join(
        f"{cluster_link(view, c)} <span class=muted>(cos {s:.3f})</span>" for c, s in cv.neighbours
    )
    facts = [
        ("size", f"{cv.size:,} images ({cv.size / total:.1%} of the run)"),
        ("cohesion", f"{cohesion_text(view, cv.mean_distance)} ({cohesion_name(view)})"),
        ("review rank", f"{cv.rank} of {len(view.clusters)} ({cv.share:.1%} of the objective)"),
    ]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    if view.labels is not None:
        rows += f"<dt>label</dt><dd>{esc(label_text(cv.label))}</dd>"
    rows += f"<dt>nearest clusters</dt><dd>{neighbours or '-'}</dd>"
    parts = [
        f'<section class="cluster" id="{cv.anchor()}">',
        f'<h2><span class="swatch" style="background:{color_hex(cv.cluster)}"></span>'
        f"Cluster {cv.cluster}</h2>",
        f'<dl class="facts">{rows}</dl>',
    ]
    if cv.size == 0:
        parts.append("<p class=muted>No image is assigned to this cluster.</p>")
    else:
        parts.append(f"<h3>Nearest the centroid ({len(cv.nearest)})</h3>")
        parts.append(gallery(view, cv.nearest, "nearest"))
        if cv.sample:
            parts.append(f"<h3>Random sample ({len(cv.sample)})</h3>")
            parts.append(gallery(view, cv.sample, "sample"))
        elif cv.size <= len(cv.nearest):
            parts.append("<p class=muted>Every member is shown above.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def pager(current: int, pages: int) -> str:
    if pages <= 1:
        return ""
    shown = sorted({1, pages, *range(max(1, current - 4), min(pages, current + 4) + 1)})
    items = []
    if current > 1:
        items.append(f'<a href="{page_name(current - 1)}" rel="prev">« previous</a>')
    last = 0
    for p in shown:
        if p - last > 1:
            items.append("<span class=muted>…</span>")
        if p == current:
            items.append(f'<span class="cur">{p}</span>')
        else:
            items.append(f'<a href="{page_name(p)}">{p}</a>')
        last = p
    if current < pages:
        items.append(f'<a href="{page_name(current + 1)}" rel="next">next »</a>')
    return f'<nav class="pager">Pages: {" ".join(items)}</nav>'


def cluster_page(view: ReportView, page: int) -> str:
    members = [c for c in view.clusters if c.page == page]
    first, last = members[0].rank, members[-1].rank
    intro = (
        f"<h1>Clusters {first}–{last} of {len(view.clusters)} in review order</h1>"
        "<p class=muted>Review order: each cluster's share of the k-means objective (its size "
        "times its mean distance to the centroid), so large and loose clusters come first. "
        'Sort by other columns in the <a href="index.html#clusters">cluster table</a>.</p>'
    )
    sections = "\n".join(cluster_section(view, c) for c in members)
    nav = pager(page, view.pages)
    body = f"{intro}\n{nav}\n{sections}\n{nav}"
    return frame(view, f"Clusters page {page}", page_name(page), body)


# --- overview ----------------------------------------------------------------------------------


def _cluster_rows(view: ReportView) -> str:
    rows = []
    for cv in view.clusters:
        label = cv.label.label if cv.label else ""
        conf = cv.label.confidence if cv.label and cv.label.confidence is not None else None
        cohesion = cv.mean_distance if cv.mean_distance is not None else -1.0
        neighbours = ", ".join(str(c) for c, _ in cv.neighbours)
        rows.append(
            f'<tr data-rank="{cv.rank}" data-cluster="{cv.cluster}" data-size="{cv.size}" '
            f'data-loose="{cohesion:.6g}" data-label="{esc(label.lower())}">'
            f'<td class=n>{cv.rank}</td><td><a href="{cv.href()}"><span class="swatch" '
            f'style="background:{color_hex(cv.cluster)}"></span>{cv.cluster}</a></td>'
            f"<td class=n>{cv.size:,}</td><td class=n>{esc(cohesion_text(view, cv.mean_distance))}"
            f"</td><td class=n>{cv.share:.2%}</td>"
            + (
                f"<td>{esc(label or '-')}</td><td class=n>{esc(fmt(conf))}</td>"
                if view.labels is not None
                else ""
            )
            + f"<td>{esc(neighbours)}</td></tr>"
        )
    return "\n".join(rows)


_TABLE_JS = """
(function () {
  var table = document.getElementById('cluster-table');
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var visible = rows;
  var perPage = 100, page = 0;
  var info = document.getElementById('ct-info');
  var filter = document.getElementById('ct-filter');
  function show() {
    var pages = Math.max(1, Math.ceil(visible.length / perPage));
    page = Math.min(Math.max(page, 0), pages - 1);
    rows.forEach(function (r) { r.hidden = true; });
    visible.slice(page * perPage, (page + 1) * perPage).forEach(function (r) {
      r.hidden = false;
    });
    info.textContent = visible.length ? ('rows ' + (page * perPage + 1) + '-' +
      Math.min(visible.length, (page + 1) * perPage) + ' of ' + visible.length) : 'no match';
  }
  function applyFilter() {
    var q = filter.value.trim().toLowerCase();
    visible = rows.filter(function (r) {
      return !q || r.dataset.cluster === q || r.dataset.label.indexOf(q) >= 0;
    });
    page = 0;
    show();
  }
  Array.prototype.forEach.call(table.querySelectorAll('th[data-key]'), function (th) {
    th.addEventListener('click', function () {
      var key = th.dataset.key;
      var desc = th.dataset.dir !== 'desc';
      th.dataset.dir = desc ? 'desc' : 'asc';
      var num = key !== 'label';
      rows.sort(function (a, b) {
        var x = a.dataset[key], y = b.dataset[key];
        var c = num ? Number(x) - Number(y) : (x < y ? -1 : x > y ? 1 : 0);
        return (desc ? -c : c) || Number(a.dataset.rank) - Number(b.dataset.rank);
      });
      rows.forEach(function (r) { body.appendChild(r); });
      applyFilter();
    });
  });
  document.getElementById('ct-prev').addEventListener('click', function () { page--; show(); });
  document.getElementById('ct-next').addEventListener('click', function () { page++; show(); });
  filter.addEventListener('input', applyFilter);
  show();
})();
""".strip()


def _short_list(view: ReportView, clusters: Sequence[ClusterView], what: str) -> str:
    items = "".join(
        f'<li><a href="{c.href()}"><span class="swatch" style="background:'
        f'{color_hex(c.cluster)}"></span>cluster {c.cluster}</a> '
        f"<span class=muted>{esc(what_value(view, c, what))}</span></li>"
        for c in clusters
    )
    return f"<ol>{items}</ol>"


def what_value(view: ReportView, c: ClusterView, what: str) -> str:
    if what == "size":
        return f"{c.size:,} images"
    if what == "cohesion":
        return f"cohesion {cohesion_text(view, c.mean_distance)}, {c.size:,} images"
    return f"{c.share:.1%} of the objective, {c.size:,} images"


def index_page(view: ReportView) -> str:
    parts = [f"<h1>Run {esc(view.run_name)}</h1>"]
    meta = f"Generated {esc(view.generated)} by semclust {esc(view.version)}"
    root = view.display.root_caption()
    if root:
        meta += f" · images from {esc(root)}"
    parts.append(f"<p class=muted>{meta}</p>")
    for note in view.notes:
        parts.append(f"<p class=muted>{esc(note)}</p>")
    cards = "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in view.counts)
    parts.append(f'<div class="cards">{cards}</div>')

    parts.append("<h2>Stages</h2>")
    parts.append(
        table(
            ["stage", "status", "seconds", "rows", "throughput (rows/s)"],
            [
                (s["stage"], s["status"], s["seconds"], s["rows"], s["throughput"])
                for s in view.stages
            ],
            [False, False, True, True, True],
        )
    )
    if view.config_rows:
        parts.append("<h2>Settings</h2>")
        parts.append(table(["setting", "value"], view.config_rows))
    if view.metrics:
        parts.append("<h2>Metrics <span class=muted>(metrics.json)</span></h2>")
        parts.append(json_block(view.metrics))
    if view.k_selection:
        parts.append("<h2>Choice of k <span class=muted>(model/k_selection.json)</span></h2>")
        parts.append(json_block(view.k_selection))

    nonempty = [c for c in view.clusters if c.size]
    largest = sorted(nonempty, key=lambda c: (-c.size, c.cluster))[:10]
    loosest = sorted(nonempty, key=lambda c: (-(c.mean_distance or 0.0), -c.size, c.cluster))[:10]
    parts.append("<h2>Review these first</h2><div class=row>")
    parts.append(
        "<div><h3>Largest share of the objective</h3>"
        + _short_list(view, view.clusters[:10], "share")
        + "</div>"
    )
    parts.append("<div><h3>Largest</h3>" + _short_list(view, largest, "size") + "</div>")
    parts.append(
        "<div><h3>Least coherent</h3>" + _short_list(view, loosest, "cohesion") + "</div></div>"
    )

    if view.map is not None:
        parts.append(map_section(view))

    parts.append('<h2 id="clusters">All clusters</h2>')
    parts.append(
        f"<p class=muted>{len(view.clusters):,} clusters; galleries on {view.pages} page(s) of "
        f"up to {max(len(c) for c in _pages(view))} clusters. Click a column to sort; type a "
        "cluster number or a label to filter.</p>"
    )
    parts.append(
        '<div class="ctl"><input id="ct-filter" type="search" placeholder="cluster or label">'
        '<button id="ct-prev" type="button">«</button><span id="ct-info"></span>'
        '<button id="ct-next" type="button">»</button></div>'
    )
    label_heads = (
        '<th data-key="label">label</th><th class=n>confidence</th>'
        if view.labels is not None
        else ""
    )
    parts.append(
        '<table id="cluster-table"><thead><tr>'
        '<th class=n data-key="rank">review rank</th><th data-key="cluster">cluster</th>'
        '<th class=n data-key="size">size</th>'
        f'<th class=n data-key="loose">cohesion</th><th class=n>share of objective</th>'
        f"{label_heads}<th>nearest clusters</th></tr></thead><tbody>\n"
        f"{_cluster_rows(view)}\n</tbody></table>"
    )
    parts.append(
        f"<p class=muted>Cohesion is the {esc(cohesion_name(view))}; nearest clusters by "
        "cosine similarity of the centroids.</p>"
    )
    return frame(view, "Overview", "index.html", "\n".join(parts), _TABLE_JS)


def _pages(view: ReportView) -> list[list[ClusterView]]:
    pages: dict[int, list[ClusterView]] = {}
    for c in view.clusters:
        pages.setdefault(c.page, []).append(c)
    return [pages[p] for p in sorted(pages)] or [[]]


def map_section(view: ReportView) -> str:
    m = view.map
    assert m is not None
    by_id = view.by_id
    links = "".join(
        f'<a href="{by_id[c].href()}" style="left:{x * 100:.2f}%;top:{y * 100:.2f}%" '
        f'title="cluster {c}">{c}</a>'
        for c, (x, y) in m.labels.items()
        if c in by_id
    )
    return (
        '<h2 id="map">Map</h2>'
        f"<p class=muted>{m.points:,} embeddings (a seeded random sample) projected to 2-D with "
        f"{esc(m.method)}, coloured by cluster; the numbers mark the largest clusters and link "
        "to their galleries.</p>"
        f'<div class="map"><img src="{m.src}" width="{m.width}" height="{m.height}" '
        f'alt="2-D map of {m.points} embeddings coloured by cluster">{links}</div>'
    )


# --- failures and duplicates -------------------------------------------------------------------


def failures_page(view: ReportView) -> str:
    f = view.failures
    d = view.display
    parts = ["<h1>Failures</h1>"]
    if not f.total:
        parts.append("<p>No image failed.</p>")
        return frame(view, "Failures", "failures.html", "\n".join(parts))
    parts.append(
        f"<p>{f.total:,} images could not be used; every one is a row in "
        "<code>failures/</code> with its reason.</p>"
    )
    parts.append("<h2>By stage</h2>")
    parts.append(table(["stage", "images"], f.by_stage, [False, True]))
    parts.append("<h2>Most common reasons</h2>")
    parts.append(
        table(
            ["stage", "reason", "images"],
            [(s, d.text(e), n) for s, e, n in f.top_reasons],
            [False, False, True],
        )
    )
    shown = len(f.rows)
    more = f" (the first {shown:,} by URI)" if shown < f.total else ""
    parts.append(f"<h2>Failed images{esc(more)}</h2>")
    rows = "\n".join(
        f'<tr><td class=uri title="{esc(d.full(uri))}">{esc(d.uri(uri))}</td>'
        f"<td>{esc(stage)}</td><td class=err>{esc(d.text(error))}</td></tr>"
        for uri, stage, error in f.rows
    )
    parts.append(
        '<table id="failures"><thead><tr><th>image</th><th>stage</th><th>reason</th></tr>'
        f"</thead><tbody>\n{rows}\n</tbody></table>"
    )
    return frame(view, "Failures", "failures.html", "\n".join(parts))


def duplicates_page(view: ReportView) -> str:
    dup = view.duplicates
    parts = ["<h1>Near-duplicates</h1>"]
    if dup is None:
        parts.append(
            "<p class=muted>This run has no <code>duplicates/</code> yet: the graph stage "
            "writes near-duplicate groups.</p>"
        )
    elif not dup.groups:
        parts.append("<p>No near-duplicate groups were found.</p>")
    else:
        parts.append(
            f"<p>{dup.groups:,} groups hold {dup.images:,} images; the {len(dup.shown):,} largest "
            "are shown.</p>"
        )
        for g in dup.shown:
            more = f", first {len(g.members)} shown" if len(g.members) < g.size else ""
            parts.append(
                f'<section class="cluster" id="g{g.group}"><h2>Group {g.group} '
                f"<span class=muted>({g.size:,} images{esc(more)})</span></h2>"
                f"{gallery(view, g.members, 'duplicates')}</section>"
            )
    return frame(view, "Near-duplicates", "duplicates.html", "\n".join(parts))
