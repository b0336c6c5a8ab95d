"""What the report reads from a real run, checked against the run's own files: cluster sizes,
the members nearest each centroid, the seeded samples, the image lookup, failures, duplicates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust.clustering.model import KMeansModel
from semclust.config import RunConfig
from semclust.context import RunContext
from semclust.report import collect, findings
from semclust.rundir.labels import read_failures
from tests.report.helpers import N_CLASSES, embedded_images

pytestmark = pytest.mark.slow


def _remote(run: Path):
    return RunContext(RunConfig(run_dir=str(run))).remote


def _assignments(run: Path) -> dict[str, list]:
    return pq.read_table(
        run / "assignments", columns=["image_id", "cluster", "distance"]
    ).to_pydict()


def test_cluster_sizes_and_nearest_to_centroid_order(report_run):
    summary = collect.summarize_assignments(
        str(report_run), N_CLASSES, 3, 2, 20, 0, remote=_remote(report_run)
    )
    table = _assignments(report_run)
    sizes = Counter(table["cluster"])
    assert summary.rows == len(table["image_id"])
    assert summary.counts.tolist() == [sizes.get(c, 0) for c in range(N_CLASSES)]

    # The nearest members are the ones truly nearest the model's centroid: recomputed here from
    # the embeddings and model/, not read back from assignments/.
    model, _ = KMeansModel.load(str(report_run))
    emb = pq.read_table(report_run / "embeddings", columns=["image_id", "embedding"])
    ids = np.asarray(emb["image_id"].to_pylist())
    x = model.transform.apply(np.asarray(emb["embedding"].to_pylist(), dtype=np.float32))
    row_of = {int(i): r for r, i in enumerate(ids)}
    cluster_of = dict(zip(table["image_id"], table["cluster"], strict=True))
    for c in range(N_CLASSES):
        members = [i for i in cluster_of if cluster_of[i] == c]
        d2 = {i: float(((x[row_of[i]] - model.centroids[c]) ** 2).sum()) for i in members}
        got = [m.image_id for m in summary.nearest[c]]
        assert len(got) == min(3, len(members)) and set(got) <= set(members)
        shown = [d2[i] for i in got]
        assert shown == pytest.approx(sorted(shown), abs=1e-4)  # nearest first
        rest = [d2[i] for i in members if i not in got]
        assert max(shown) <= min(rest, default=np.inf) + 1e-4  # no closer member left out
        assert all(m.cluster == c for m in summary.nearest[c])


def test_sampled_members_are_seeded_members_beside_the_nearest(report_run):
    def sample(seed: int) -> dict[int, list[int]]:
        summary = collect.summarize_assignments(
            str(report_run), N_CLASSES, 2, 3, 0, seed, remote=_remote(report_run)
        )
        for c in range(N_CLASSES):
            near = {m.image_id for m in summary.nearest[c]}
            members = {m.image_id for m in summary.sample[c]}
            assert not near & members
            assert len(members) == min(3, max(0, int(summary.counts[c]) - 2))
        return {c: sorted(m.image_id for m in summary.sample[c]) for c in range(N_CLASSES)}

    first = sample(5)
    assert sample(5) == first  # the same seed, the same members
    assert sample(6) != first  # another seed, another sample
    table = _assignments(report_run)
    cluster_of = dict(zip(table["image_id"], table["cluster"], strict=True))
    assert all(cluster_of[i] == c for c, ids in first.items() for i in ids)


def test_lookup_gives_uris_sizes_and_the_map_embeddings(report_run):
    images = embedded_images(report_run)
    wanted = set(sorted(images)[:5])
    map_ids = np.array(sorted(images)[-7:], dtype=np.int64)
    found = collect.lookup_embeddings(str(report_run), wanted, map_ids, remote=_remote(report_run))
    assert set(found.meta) == wanted
    assert all(found.meta[i][0] == images[i] for i in wanted)
    assert all(w > 0 and h > 0 and t is None for _, w, h, t in found.meta.values())
    emb = pq.read_table(report_run / "embeddings", columns=["image_id", "embedding"]).to_pydict()
    vectors = dict(zip(emb["image_id"], emb["embedding"], strict=True))
    assert sorted(found.map_ids.tolist()) == map_ids.tolist()
    for i, v in zip(found.map_ids.tolist(), found.map_vectors, strict=True):
        np.testing.assert_allclose(v, vectors[i], rtol=1e-6)

    stale = wanted | {12345}
    with pytest.raises(RuntimeError, match="assignments are stale"):
        collect.lookup_embeddings(str(report_run), stale, map_ids, remote=_remote(report_run))


def test_failures_are_listed_up_to_the_cap_and_all_counted(report_run):
    table = pq.read_table(report_run / "failures").to_pydict()
    every = read_failures(str(report_run), limit=100)
    capped = read_failures(str(report_run), limit=2)
    assert every.total == capped.total == len(table["uri"]) == 4
    assert capped.rows == every.rows[:2] and len(every.rows) == 4
    assert [r[0] for r in every.rows] == sorted(table["uri"])
    assert sum(n for _, n in capped.by_stage) == 4
    assert sum(n for _, _, n in capped.top_reasons) == 4


def test_duplicate_groups_largest_first_and_capped(report_run):
    dup = findings.summarize_duplicates(str(report_run), max_groups=1, per_group=2)
    assert dup is not None
    assert (dup.groups, dup.images) == (2, 5)  # the lone image of group 11 is no group
    assert [(g.group, g.size) for g in dup.shown] == [(7, 3)]
    table = pq.read_table(report_run / "duplicates").to_pydict()
    group7 = sorted(i for i, g in zip(table["image_id"], table["group"], strict=True) if g == 7)
    assert [m.image_id for m in dup.shown[0].members] == group7[:2]
