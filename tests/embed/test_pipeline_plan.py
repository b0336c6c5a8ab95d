"""How the embed stage shares a cluster out (``embed.resources``), and the Ray Data plan it
builds: each part's read fused with its decode, and decode never fused into the model actor."""

from __future__ import annotations

import pytest

from semclust.config import load_config
from semclust.embed.resources import ClusterShape, EmbedPlan, plan


def _embed(**overrides):
    return load_config(None, {f"embed.{k}": v for k, v in overrides.items()}).embed


@pytest.mark.parametrize(
    ("gpu", "shape", "overrides", "expected"),
    [
        # 2-core laptop: one actor using both cores, one decode slot.
        (False, ClusterShape(2, 2, 0), {}, EmbedPlan(1, 1, 2, 1)),
        # A 32-core CPU node: two actors of 16 threads, decode on the other 30 slots.
        (False, ClusterShape(32, 32, 0), {}, EmbedPlan(2, 2, 16, 30)),
        # Four 8-core CPU nodes: two actors, each at most one node's cores.
        (False, ClusterShape(8, 32, 0), {}, EmbedPlan(2, 2, 8, 30)),
        # 4 GPUs on 64 CPUs: the pool grows from 1 to 4 actors, TF's own threads.
        (True, ClusterShape(16, 64, 4), {}, EmbedPlan(1, 4, None, 60)),
        # What the config fixes wins.
        (False, ClusterShape(32, 32, 0), {"num_actors": 4, "threads": 3}, EmbedPlan(4, 4, 3, 28)),
        (True, ClusterShape(16, 64, 4), {"num_actors": 2}, EmbedPlan(2, 2, None, 62)),
        (False, ClusterShape(2, 2, 0), {"decode_num_cpus": 0.5}, EmbedPlan(1, 1, 2, 2)),
    ],
)
def test_the_plan_follows_the_cluster_unless_the_config_fixes_it(gpu, shape, overrides, expected):
    assert plan(_embed(**overrides), gpu, shape) == expected


def test_decode_is_its_own_operator_and_never_fused_into_the_model_actor(ray_local, tmp_path):
    """On 2 CPUs the plan has one decoder and one actor with equal CPU claims: the case where
    Ray Data would fuse them (decode and model would then run one after the other)."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    from semclust.context import RunContext
    from semclust.embed import stage
    from semclust.embed.actors import EmbedderSpec
    from semclust.embed.todo import TodoPart

    cfg = load_config(
        None,
        {
            "run_dir": str(tmp_path),
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": "default",
        },
    )
    ctx = RunContext(cfg)
    shape = ClusterShape(2, 2, 0)
    the_plan = plan(cfg.embed, False, shape)
    assert (the_plan.max_actors, the_plan.decoders) == (1, 1)
    parts = [TodoPart(0, 3, str(tmp_path / "part-00000.parquet"))]
    ds = stage._pipeline(ctx, parts, EmbedderSpec.from_config(cfg.embed), False, the_plan)
    physical, _ = get_execution_plan(ds._logical_plan)
    names = []
    op = physical.dag
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    names.reverse()
    assert names[-3:] == [
        "ReadTodo->MapBatches(decode_stage)",
        "MapBatches(EmbedActor)",
        "MapBatches(commit_batch)",
    ], names
