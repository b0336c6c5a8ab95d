"""The stage registry: one declaration per stage, and what an overwrite of each one clears."""

from __future__ import annotations

import pytest

from semclust import stages
from semclust.errors import UserError


def _dependents(name: str) -> list[str]:
    return [name, *(s.name for s in stages.dependents(name))]


def test_overwrite_clears_only_the_stages_that_read_a_stage():
    assert _dependents("embed") == stages.names()
    assert _dependents("cluster") == [
        "cluster",
        "refine_scan",
        "refine_dec",
        "label",
        "evaluate",
        "report",
    ]
    assert _dependents("graph") == ["graph", "refine_scan", "label", "evaluate", "report"]
    assert _dependents("index") == ["index", "evaluate", "report"]
    assert _dependents("refine_dec") == ["refine_dec", "label", "evaluate", "report"]
    assert _dependents("label") == ["label", "evaluate", "report"]
    assert _dependents("evaluate") == ["evaluate", "report"]
    assert _dependents("report") == ["report"]
    with pytest.raises(UserError, match="unknown stage 'search'"):
        stages.dependents("search")


def test_every_output_has_one_owner_and_reads_name_earlier_stages():
    seen: dict[str, str] = {}
    for position, stage in enumerate(stages.STAGES):
        for name in stage.writes:
            assert name not in seen, f"{name} is written by {seen.get(name)} and {stage.name}"
            seen[name] = stage.name
        earlier = {s.name for s in stages.STAGES[:position]}
        assert set(stage.reads) <= earlier, f"{stage.name} reads a later or unknown stage"
    assert {"metrics.json", "report"} <= set(seen)


def test_commands_and_variants():
    assert stages.commands() == [
        "embed",
        "cluster",
        "graph",
        "index",
        "refine",
        "label",
        "evaluate",
        "report",
    ]
    assert stages.for_command("refine", "dec").name == "refine_dec"
    assert stages.for_command("refine", stages.default_variant("refine")).name == "refine_scan"
    with pytest.raises(UserError, match="choose one of scan, dec"):
        stages.for_command("refine", "kmeans")
    for stage in stages.STAGES:  # every declared module exists and implements the contract
        module = stage.implementation()
        for name in ("settings", "run", "summary"):
            assert callable(getattr(module, name, None)), f"{stage.module} lacks {name}()"
