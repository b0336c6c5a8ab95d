"""HTML of the overview page (index.html): counts, stages, settings, metrics, the clusters to
review first, the map, and the sortable, filterable table of every cluster."""

from __future__ import annotations

from collections.abc import Sequence

from semclust.report.map2d import color_hex
from semclust.report.markup import esc, fmt, frame, json_block, table
from semclust.report.views import ClusterView, ReportView, cohesion_name, cohesion_text


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
    parts = [*_run_facts(view), *_review_first(view)]
    if view.map is not None:
        parts.append(map_section(view))
    parts += _cluster_table(view)
    return frame(view, "Overview", "index.html", "\n".join(parts), _TABLE_JS)


def _run_facts(view: ReportView) -> list[str]:
    """The run's name, counts, stage timings, settings, metrics and choice of k."""
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

    if view.growth:
        parts += _growth(view)
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
    return parts


def _growth(view: ReportView) -> list[str]:
    """The images added to the run (``semclust add``) and how far they sit from the clusters."""
    rows = []
    for g in view.growth:
        worst = ", ".join(
            f"{c['cluster']} ({c['share_beyond']:.0%} of {c['added']})" for c in g["clusters"]
        )
        share = g["share_beyond"]
        rows.append(
            (
                view.display.text(str(g["input"])),
                g["added"],
                g["failed"],
                g["rows_after"],
                "-" if share is None else f"{share:.1%}" + (" (drifted)" if g["drifted"] else ""),
                worst or "-",
            )
        )
    expected = view.growth[-1].get("expected_share")
    note = (
        f"beyond: added images farther from their centroid than the run's own "
        f"{1 - expected:.0%} (by chance about {expected:.0%})."
        if expected is not None
        else ""
    )
    return [
        "<h2>Images added</h2>",
        table(
            ["input", "added", "failed", "rows after", "beyond", "clusters most beyond"],
            rows,
            [False, True, True, True, True, False],
        ),
        f"<p class=muted>{esc(note)}</p>",
    ]


def _review_first(view: ReportView) -> list[str]:
    """Three short lists: largest share of the objective, largest, least coherent."""
    nonempty = [c for c in view.clusters if c.size]
    largest = sorted(nonempty, key=lambda c: (-c.size, c.cluster))[:10]
    loosest = sorted(nonempty, key=lambda c: (-(c.mean_distance or 0.0), -c.size, c.cluster))[:10]
    return [
        "<h2>Review these first</h2><div class=row>",
        "<div><h3>Largest share of the objective</h3>"
        + _short_list(view, view.clusters[:10], "share")
        + "</div>",
        "<div><h3>Largest</h3>" + _short_list(view, largest, "size") + "</div>",
        "<div><h3>Least coherent</h3>" + _short_list(view, loosest, "cohesion") + "</div></div>",
    ]


def _cluster_table(view: ReportView) -> list[str]:
    """Every cluster in one table, with the controls ``_TABLE_JS`` wires up."""
    label_heads = (
        '<th data-key="label">label</th><th class=n>confidence</th>'
        if view.labels is not None
        else ""
    )
    return [
        '<h2 id="clusters">All clusters</h2>',
        f"<p class=muted>{len(view.clusters):,} clusters; galleries on {view.pages} page(s) of "
        f"up to {max(len(c) for c in _pages(view))} clusters. Click a column to sort; type a "
        "cluster number or a label to filter.</p>",
        '<div class="ctl"><input id="ct-filter" type="search" placeholder="cluster or label">'
        '<button id="ct-prev" type="button">«</button><span id="ct-info"></span>'
        '<button id="ct-next" type="button">»</button></div>',
        '<table id="cluster-table"><thead><tr>'
        '<th class=n data-key="rank">review rank</th><th data-key="cluster">cluster</th>'
        '<th class=n data-key="size">size</th>'
        f'<th class=n data-key="loose">cohesion</th><th class=n>share of objective</th>'
        f"{label_heads}<th>nearest clusters</th></tr></thead><tbody>\n"
        f"{_cluster_rows(view)}\n</tbody></table>",
        f"<p class=muted>Cohesion is the {esc(cohesion_name(view))}; nearest clusters by "
        "cosine similarity of the centroids.</p>",
    ]


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
