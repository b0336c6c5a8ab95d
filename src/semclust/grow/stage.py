"""``semclust add NEW_INPUT --run-dir R``: images added to a finished run, its ids kept.

The run's own recorded config is used (the backbone, the clustering, the graph, the labels);
the command line sets only where Ray and the store are and the ``add`` section. In order:

1. embed: the embed stage over ``NEW_INPUT`` on the run directory; URIs already embedded are
   skipped (a repeated ``add`` embeds nothing), the rest go to new parts numbered after the
   run's last (the embed record of the run is left as it was);
2. cluster: the added parts assigned to the existing centroids (cluster ids unchanged);
3. graph: the added rows' kNN edges and the old edges they change (``grow.graph``), then the
   near-duplicate groups again, groups keeping their ids (``duplicates.keep_group_ids``);
4. index: the added rows appended to the index, nothing retrained (``grow.index``);
5. labels: the added rows labelled by the label stage's rules (``grow.labels``);
6. drift: the share of added images beyond the run's own 99th-percentile distance to their
   centroid (``grow.drift``), with advice to re-cluster past ``add.drift_threshold``;
7. the cluster, graph and index records take the grown embeddings as theirs, so a later
   ``--mode resume`` keeps them; the report is rebuilt (unless ``--no-report``).

A stop anywhere is resumed by the same command: the parts an unfinished ``add`` was adding are
kept in its record, and every step is idempotent. The SCAN/DEC heads keep no model, so their
assignments do not cover added images until ``semclust refine`` runs again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from semclust import runinfo, storage
from semclust.config import RunConfig, StorageConfig, from_dict, replace
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.rundir.layout import ASSIGNMENTS, KNN, LABELS
from semclust.rundir.tables import part_uri

log = logging.getLogger(__name__)

NAME = "add"


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def run_config(cli: RunConfig, input_uri: str) -> RunConfig:
    """The config of the add: the run's recorded config, with the command line's ``ray`` and
    ``add`` sections, its ``storage`` where it sets one, and ``embed.input`` = ``input_uri``."""
    run_dir = cli.run_dir or ""
    with storage.using(storage.resolved(cli.storage)):
        if not storage.exists(runinfo.run_json_uri(run_dir)):
            raise UserError(
                f"{run_dir!r} holds no run (no run.json): `semclust add` grows a finished run; "
                "make one with `semclust run`"
            )
        recorded = runinfo.load(run_dir).get("config") or {}
    tree = {**recorded}
    tree.pop("add", None)
    # A run recorded by another semclust may hold keys this one lacks: they are left out, and
    # the values that remain are checked as always.
    base = from_dict(tree, known_only=True)
    storage_section = cli.storage if cli.storage != StorageConfig() else base.storage
    return replace(
        base,
        run_dir=run_dir,
        mode="resume",
        **{"embed.input": input_uri},
        ray=asdict(cli.ray),
        storage=asdict(storage_section),
        add=asdict(cli.add),
    )


class AddStage:
    """``add`` under the stage contract (``stage.run_stage``): its record is ``stages.add``."""

    name = NAME
    section = NAME
    reads = ("embed", "cluster")
    writes: tuple[str, ...] = ()

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        from semclust.clustering import model as model_files

        stages = runinfo.load(ctx.run_dir).get("stages", {})
        for needed in ("embed", "cluster"):
            if stages.get(needed, {}).get("status") != "done":
                raise UserError(
                    f"{ctx.run_dir!r} has no finished {needed} stage: `semclust add` grows a "
                    f"finished run; run `semclust {needed}` on it first"
                )
        if not model_files.is_complete(ctx.run_dir):
            raise UserError(
                f"{ctx.run_dir!r} has no complete k-means model: run `semclust cluster`"
            )
        return {"input": ctx.cfg.embed.input, "add": asdict(ctx.cfg.add)}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return grow(ctx)

    def summary(self, record: dict[str, Any]) -> str:
        line = f"add: {record['rows_added']} images added ({record['embed']['failed']} failed)"
        drift = record.get("drift") or {}
        if drift.get("share_beyond") is not None:
            line += f", {drift['share_beyond']:.1%} beyond the run's own distances"
        return line


def grow(ctx: RunContext) -> dict[str, Any]:
    """The add's work (see the module); its record."""
    from semclust.embed import stage as embed_stage
    from semclust.rundir.embeddings import embedding_shards

    run_dir = ctx.run_dir
    start = time.perf_counter()
    history = list(ctx.previous.get("runs", []))
    unfinished = (
        list(ctx.previous.get("pending_parts", [])) if ctx.previous.get("status") != "done" else []
    )
    assigned = {_name(u) for u in storage.list_shards(storage.join(run_dir, ASSIGNMENTS))}
    embed_ctx = RunContext(ctx.cfg, command=ctx.command, lock=ctx.lock)
    embed_ctx.previous = runinfo.load(run_dir).get("stages", {}).get("embed", {})
    embed_ctx.settings = embed_stage.settings(embed_ctx)
    embedded = embed_stage.run(embed_ctx)
    shards = embedding_shards(run_dir)
    added_names = {_name(u) for u in shards.uris if _name(u) not in assigned} | set(unfinished)
    added = [u for u in shards.uris if _name(u) in added_names]
    embed_summary = {
        key: embedded.get(key)
        for key in ("listed", "embedded", "failed", "already_committed", "processed_this_run")
    }
    if embedded.get("videos"):
        embed_summary["videos"] = embedded["videos"]
    record: dict[str, Any] = {
        "input": ctx.cfg.embed.input,
        "embed": embed_summary,
        "parts_added": len(added),
        "rows_added": sum(n for u, n in zip(shards.uris, shards.rows, strict=True) if u in added),
        "rows": shards.total,
    }
    if added:
        _mark_pending(ctx, sorted(added_names), history)
        record.update(_extend(ctx, shards, added))
    record["seconds_total"] = round(time.perf_counter() - start, 3)
    record["runs"] = [*history, {k: v for k, v in record.items() if k != "runs"}]
    return record


def _mark_pending(ctx: RunContext, names: list[str], history: list[dict[str, Any]]) -> None:
    """Keep the parts being added in run.json (with the earlier adds), so that a stopped add
    finishes them."""
    runinfo.update_stage(
        ctx.run_dir,
        NAME,
        {"status": "running", "settings": ctx.settings, "pending_parts": names, "runs": history},
        ctx.cfg.to_dict(),
        NAME,
    )


def _extend(ctx: RunContext, shards: Any, added: list[str]) -> dict[str, Any]:
    """Steps 2-7 over the ``added`` shards; their part of the record."""
    from semclust.clustering import model as model_files
    from semclust.clustering.assign import assign_shards
    from semclust.grow.drift import measure_drift, read_distances
    from semclust.ray_runtime import use_gpu

    run_dir = ctx.run_dir
    cfg = ctx.cfg
    ctx.start_ray()  # the embed step starts it only when it had images to embed
    stages = runinfo.load(run_dir).get("stages", {})
    out: dict[str, Any] = {}
    k = int(model_files.read_summary(run_dir)["k"])
    to_assign = [u for u in added if not storage.exists(part_uri(run_dir, ASSIGNMENTS, u))]
    with runinfo.timed("add: assignment") as t:
        if to_assign:
            ctx.ensure_held()
            assign_shards(
                ctx,
                cfg.cluster,
                k,
                to_assign,
                lambda u: part_uri(run_dir, ASSIGNMENTS, u),
                use_gpu(cfg.cluster.device),
            )
    out["assign_seconds"] = t["seconds"]
    graph_record = stages.get("graph", {})
    if graph_record.get("status") == "done":
        out["graph"] = _grow_graph(ctx, shards, added, graph_record)
    index_record = stages.get("index", {})
    if index_record.get("status") == "done":
        out["index"] = _grow_index(ctx, shards)
    label_record = stages.get("label", {})
    if label_record.get("status") == "done" and storage.list_shards(storage.join(run_dir, LABELS)):
        out["labels"] = _carry_labels(ctx, added, label_record, graph_record)
    names = {_name(u) for u in added}
    distances = read_distances(run_dir, names)
    ac = cfg.add
    out["drift"] = measure_drift(
        distances[False],
        distances[True],
        k,
        ac.drift_quantile,
        ac.min_cluster_rows,
        ac.drift_threshold,
    )
    if out["drift"].get("advice"):
        log.warning("add: %s", out["drift"]["advice"])
    stale = [s for s in ("refine_scan", "refine_dec", "evaluate") if s in stages]
    if stale:
        log.warning(
            "add: %s do not cover the added images: run them again (`semclust refine`, "
            "`semclust evaluate`)",
            ", ".join(stale),
        )
    out["not_extended"] = stale
    _adopt(run_dir, shards, out)
    return out


def _grow_graph(
    ctx: RunContext, shards: Any, added: list[str], graph_record: dict[str, Any]
) -> dict[str, Any]:
    from semclust.clustering.duplicates import write_duplicates
    from semclust.grow.graph import grow_graph
    from semclust.rundir.tables import read_duplicates

    run_dir = ctx.run_dir
    pending = [u for u in added if not storage.exists(part_uri(run_dir, KNN, u))]
    out: dict[str, Any] = {"method": graph_record.get("method")}
    with runinfo.timed("add: kNN graph") as t:
        if pending:
            out.update(
                grow_graph(
                    ctx,
                    shards,
                    pending,
                    int(graph_record["k"]),
                    graph_record["metric"],
                    exact_graph=str(graph_record.get("method", "")).startswith("exact"),
                    search=ctx.cfg.add.graph_search,
                    target_recall=ctx.cfg.graph.target_recall,
                )
            )
    out["seconds"] = t["seconds"]
    before = graph_record.get("duplicates")
    if before:
        ctx.ensure_held()
        out["duplicates"] = write_duplicates(
            run_dir, shards, float(before["threshold"]), keep=read_duplicates(run_dir)
        )
    return out


def _grow_index(ctx: RunContext, shards: Any) -> dict[str, Any]:
    from semclust.grow.index import grow_index
    from semclust.index.faiss_ops import task_resources

    ic = ctx.cfg.index
    ctx.ensure_held()
    with runinfo.timed("add: index") as t:
        task = ctx.remote(grow_index, **task_resources(ic.device, ic.num_cpus))
        meta = ctx.start_ray().get(task.remote(ctx.run_dir, shards))
    return {"count": meta["count"], "grown": meta.get("grown", [])[-1:], "seconds": t["seconds"]}


def _carry_labels(
    ctx: RunContext, added: list[str], label_record: dict[str, Any], graph_record: dict[str, Any]
) -> dict[str, Any]:
    from semclust.grow.labels import carry_labels
    from semclust.index.faiss_ops import node_resources

    ray = ctx.start_ray()
    cpus, _ = node_resources()
    ctx.ensure_held()
    task = ctx.remote(carry_labels, num_cpus=float(max(1.0, cpus)))
    metric = graph_record.get("metric", "cosine")
    return dict(ray.get(task.remote(ctx.run_dir, ctx.cfg.label, label_record, added, metric)))


def _adopt(run_dir: str, shards: Any, out: dict[str, Any]) -> None:
    """The cluster, graph and index records take the grown embeddings as their own: their
    outputs now cover every row, so a resume keeps them."""
    info = runinfo.load(run_dir)
    stages = info.get("stages", {})
    fingerprint = shards.fingerprint()
    for name in ("cluster", "graph", "index"):
        rec = stages.get(name)
        if not rec or rec.get("status") != "done" or (name != "cluster" and name not in out):
            continue
        if isinstance(rec.get("settings"), dict) and "embeddings" in rec["settings"]:
            rec["settings"]["embeddings"] = fingerprint
        rec["rows" if name != "index" else "count"] = shards.total
        rec.setdefault("grown_by_add", 0)
        rec["grown_by_add"] += 1
    storage.write_json(runinfo.run_json_uri(run_dir), info)


def add(cli: RunConfig, input_uri: str, command: str = "semclust add") -> dict[str, Any]:
    """Grow ``cli.run_dir`` by the images of ``input_uri`` (see the module); the add record."""
    from semclust.runner import holding_run_dir, run_stages
    from semclust.stage import run_stage

    cfg = run_config(cli, input_uri)
    with (
        storage.using(storage.resolved(cfg.storage)),
        holding_run_dir(cfg.run_dir or "", command, must_exist=True) as held,
    ):
        ctx = RunContext(cfg, command=command, lock=held)
        record = run_stage(AddStage(), ctx, [])
        report = runinfo.load(cfg.run_dir or "").get("stages", {}).get("report", {})
        if cfg.add.report and record.get("parts_added") and report.get("status") == "done":
            run_stages(cfg, ["report"], command, held)
    return record
