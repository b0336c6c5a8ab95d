"""HTML of the cluster galleries, the failures page and the near-duplicates page (the overview
is ``overview``; the frame, tables and escaping are ``markup``)."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from semclust.report.collect import Member
from semclust.report.findings import ClusterLabel
from semclust.report.map2d import color_hex
from semclust.report.markup import esc, frame, table
from semclust.report.thumbs import thumb_size
from semclust.report.views import (
    ClusterView,
    ReportView,
    cohesion_name,
    cohesion_text,
    member_score,
    page_name,
)
from semclust.rundir.frames import clock, frame_label


def figure(view: ReportView, m: Member, prefix: str = "") -> str:
    caption = view.display.uri(m.uri) if m.uri else str(m.image_id)
    name = posixpath.basename(caption) or caption
    if m.frame_time is not None:  # a video frame: the video's name and the frame's time
        caption = name = f"{name} @ {clock(m.frame_time)}"
    lines = [esc(name)]
    score = member_score(view, m)
    if score:
        lines.append(esc(score))
    if m.label is not None:
        conf = f" {m.confidence:.2f}" if m.confidence is not None else ""
        lines.append(f"<b>{esc(m.label)}</b>{esc(conf)}")
    title = view.display.full(m.uri) if m.uri else str(m.image_id)
    if m.frame_time is not None:
        title = frame_label(title, m.frame_time)
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
