"""Every stage of semclust, in the order they run (the contract is in ``semclust.stage``).

This list is the one place that knows the stages: the CLI makes one subcommand per ``command``
from it (with the flags of its config ``section``), ``semclust run`` runs ``RUN``, and
``--mode overwrite`` of a stage clears its ``writes`` and those of every stage that reads them.
"""

from __future__ import annotations

from semclust.errors import UserError
from semclust.rundir import layout
from semclust.stage import StageSpec

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="embed",
        command="embed",
        section="embed",
        reads=(),
        writes=(layout.EMBEDDINGS, layout.FAILURES),  # and embed-todo/ while it runs
        module="semclust.embed.stage",
        help="images -> embeddings/ and failures/",
        creates_run_dir=True,
    ),
    StageSpec(
        name="cluster",
        command="cluster",
        section="cluster",
        reads=("embed",),
        writes=(layout.MODEL, layout.ASSIGNMENTS),
        module="semclust.clustering.cluster_stage",
        help="embeddings/ -> model/ and assignments/ (FAISS k-means)",
    ),
    StageSpec(
        name="graph",
        command="graph",
        section="graph",
        reads=("embed",),
        writes=(layout.KNN, layout.DUPLICATES),
        module="semclust.clustering.graph_stage",
        help="embeddings/ -> knn/ and duplicates/ (FAISS kNN graph, exact or IVF/HNSW)",
    ),
    StageSpec(
        name="index",
        command="index",
        section="index",
        reads=("embed",),
        writes=(layout.INDEX,),
        module="semclust.index.stage",
        help="embeddings/ -> index/ (FAISS index sized to N and --index-memory)",
    ),
    StageSpec(
        name="refine_scan",
        command="refine",
        section="refine",
        reads=("cluster", "graph"),
        writes=(layout.assignments_of("scan"),),
        module="semclust.clustering.refine_stage",
        help="SCAN or DEC head on embeddings (+ knn/) -> assignments_scan|dec/",
        variant="scan",
    ),
    StageSpec(
        name="refine_dec",
        command="refine",
        section="refine",
        reads=("cluster",),
        writes=(layout.assignments_of("dec"),),
        module="semclust.clustering.refine_stage",
        help="SCAN or DEC head on embeddings (+ knn/) -> assignments_scan|dec/",
        variant="dec",
    ),
    StageSpec(
        name="label",
        command="label",
        section="label",
        reads=("cluster", "graph", "refine_scan", "refine_dec"),
        writes=(layout.LABELS,),
        module="semclust.label.stage",
        help="labels/ from reference images, seed labels or cluster names",
    ),
    StageSpec(
        name="evaluate",
        command="evaluate",
        section="evaluate",
        reads=("embed", "cluster", "graph", "index", "refine_scan", "refine_dec", "label"),
        writes=(layout.METRICS,),
        module="semclust.evaluate.stage",
        help="metrics.json: scores against known classes, and label-free scores",
    ),
    StageSpec(
        name="report",
        command="report",
        section="report",
        reads=("embed", "cluster", "graph", "refine_scan", "refine_dec", "label", "evaluate"),
        writes=(layout.REPORT,),
        module="semclust.report.stage",
        help="static HTML review report: cluster galleries, 2-D map, failures",
    ),
)

# `semclust run`: the stages a run needs to be searched and reviewed.
RUN: tuple[str, ...] = ("embed", "cluster", "graph", "index", "report")


def by_name(name: str) -> StageSpec:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage {name!r}; choose one of {', '.join(names())}")


def names() -> list[str]:
    return [stage.name for stage in STAGES]


def commands() -> list[str]:
    """The stage subcommands, in order, each once."""
    return list(dict.fromkeys(stage.command for stage in STAGES))


def for_command(command: str, variant: str | None = None) -> StageSpec:
    """The stage a subcommand runs (for ``refine``, the one of ``refine.method``)."""
    matches = [s for s in STAGES if s.command == command]
    if not matches:
        raise UserError(f"unknown command {command!r}; choose one of {', '.join(commands())}")
    if len(matches) == 1:
        return matches[0]
    for stage in matches:
        if stage.variant == variant:
            return stage
    allowed = ", ".join(str(s.variant) for s in matches)
    raise UserError(f"{command}: method={variant!r} is not allowed; choose one of {allowed}")


def dependents(name: str) -> list[StageSpec]:
    """The stages that read ``name``'s outputs, directly or through another stage, in order."""
    stale = {by_name(name).name}
    out: list[StageSpec] = []
    for stage in STAGES:  # the list is in a topological order
        if stage.name not in stale and any(dep in stale for dep in stage.reads):
            stale.add(stage.name)
            out.append(stage)
    return out


def default_variant(command: str) -> str | None:
    """The variant a command runs when its config does not say (the first declared)."""
    return next(s.variant for s in STAGES if s.command == command)
