"""``semclust select-backbone``: which backbone suits these images, chosen by score.

The choice users otherwise make by hand (embed a sample with each candidate, cluster it, look
at the scores). One seeded sample of the input is drawn once and written as a manifest,
``OUT/sample.parquet``; every backbone embeds exactly those images into its own run directory
``OUT/<backbone>``, which is clustered with the same k and seed and evaluated. Each run is a
normal run under the stage contract, so a second call resumes (committed parts are kept) and
``semclust compare OUT/*`` or ``semclust report`` work on it as on any run.

Ranking, best first, written to ``OUT/selection.json``:
- with truth (``--truth folder-names`` or a file): the mean of k-means' ACC and NMI;
- without: the mean of the backbone's ranks by the label-free scores that do not depend on the
  embedding's dimension or scale (``LABEL_FREE_SCORES``): cosine silhouette, k-means seed
  stability (mean pairwise ARI of seeded k-means runs on one sample) and kNN agreement (the
  share of each row's 10 nearest neighbours that those runs put in its cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import registry, storage
from semclust.compare import format_table, run_rows
from semclust.errors import UserError
from semclust.rundir import layout

log = logging.getLogger(__name__)

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SAMPLE_FILE = "sample.parquet"
SAMPLE_INFO = "sample.json"
SELECTION_FILE = "selection.json"
# The table's columns: compare's, less those of one run's settings that are equal here.
SHOWN = (
    "rank",
    "backbone",
    "acc",
    "nmi",
    "silhouette",
    "stability_ari",
    "knn_agreement",
    "balance",
    "dim",
)
LABEL_FREE_SCORES = ("silhouette", "stability_ari", "knn_agreement")


def write_sample(input_uri: str, out_dir: str, size: int, seed: int) -> int:
    """Draw ``size`` images of ``input_uri`` (seeded, without replacement) into the manifest
    ``out_dir/sample.parquet``; the number drawn. A second call with the same settings reuses the
    sample; other settings over the same ``out_dir`` stop with a message (the runs under it were
    embedded from the first sample)."""
    from semclust.embed.sources import InputStream

    wanted = {"input": input_uri, "size": size, "seed": seed}
    info_uri = storage.join(out_dir, SAMPLE_INFO)
    if storage.exists(info_uri):
        info = storage.read_json(info_uri)
        if {key: info.get(key) for key in wanted} != wanted:
            raise UserError(
                f"{out_dir} holds a sample of {info.get('input')!r} (size {info.get('size')}, "
                f"seed {info.get('seed')}); use another --out for {input_uri!r} with these settings"
            )
        return int(info["drawn"])
    stream = InputStream(input_uri)
    uris, keys = _draw(stream.pages(), size, seed)
    if stream.listed == 0:
        raise UserError(f"no images found under {input_uri!r}")
    storage.write_parquet(
        storage.join(out_dir, SAMPLE_FILE), pa.table({"uri": uris.take(np.argsort(keys))})
    )
    storage.write_json(info_uri, {**wanted, "listed": stream.listed, "drawn": len(uris)})
    return len(uris)


def _draw(pages: Iterable[pa.Table], size: int, seed: int) -> tuple[pa.Array, np.ndarray]:
    """The ``size`` images with the smallest seeded keys of their ids, over a streamed listing:
    memory bounded by the sample (a listing of millions is never held), and the same sample
    whatever order the store lists in. The key is a bijection of the id (XOR, then an odd
    multiplier mod 2^64), so distinct images never tie."""
    mix = np.uint64((seed * 0xD1B54A32D192ED03 + 1) % 2**64)
    kept_uris, kept_keys = pa.array([], pa.string()), np.array([], np.uint64)
    for page in pages:
        ids = page.column("image_id").to_numpy().astype(np.uint64)
        keys = np.concatenate([kept_keys, (ids ^ mix) * np.uint64(0x9E3779B97F4A7C15)])
        uris = pa.concat_arrays([kept_uris, page.column("uri").combine_chunks().cast(pa.string())])
        if len(keys) > size:
            best = np.argpartition(keys, size - 1)[:size]
            keys, uris = keys[best], uris.take(pa.array(best))
        kept_uris, kept_keys = uris, keys
    return kept_uris, kept_keys


def rank_backbones(rows: list[dict[str, Any]], with_truth: bool) -> list[dict[str, Any]]:
    """The k-means rows of each backbone, best first, each with its ``rank`` (1 = best) and
    ``score`` (what they were ranked by)."""
    rows = [dict(r) for r in rows]
    if not rows:
        return rows
    if with_truth:
        for r in rows:
            r["score"] = _mean([r.get("acc"), r.get("nmi")])
    else:
        rank_sums = np.zeros(len(rows))
        for key in LABEL_FREE_SCORES:
            values = np.array([_or_worst(r.get(key)) for r in rows])
            # Rank 1 for the highest value; ties share the better rank.
            rank_sums += np.array([1 + int((values > v).sum()) for v in values])
        for r, total in zip(rows, rank_sums, strict=True):
            # Higher is better, like the truth score.
            r["score"] = -float(total) / len(LABEL_FREE_SCORES)
    rows.sort(key=lambda r: (-_or_worst(r["score"]), r["backbone"]))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _or_worst(value: float | None) -> float:
    return -np.inf if value is None else float(value)


def select_backbone(
    input_uri: str,
    out_dir: str,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    *,
    sample: int = 2000,
    k: int = 20,
    truth: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed, cluster and evaluate one sample with each backbone; the ranking (see the module's
    docstring), also written to ``out_dir/selection.json``."""
    from semclust.config import load_config
    from semclust.embed.backbones import get_backbone
    from semclust.runner import run_stages

    unknown = [b for b in backbones if b not in registry.BACKBONES]
    if unknown or len(set(backbones)) != len(backbones) or not backbones:
        raise UserError(
            f"--backbones {' '.join(backbones)}: name each once, from "
            f"{', '.join(registry.backbone_names())}"
        )
    if sample < 2 * k:
        raise UserError(f"--sample {sample} is too small for k={k}: use at least {2 * k} images")
    extra = dict(overrides or {})
    storage_settings = load_config(None, extra).storage
    with storage.using(storage_settings):
        drawn = write_sample(input_uri, out_dir, sample, seed)
    manifest = storage.join(out_dir, SAMPLE_FILE)
    rows: list[dict[str, Any]] = []
    for name in backbones:
        run_dir = storage.join(out_dir, name)
        cfg = load_config(
            None,
            {
                **extra,
                "run_dir": run_dir,
                "embed.input": manifest,
                "embed.backbone": name,
                "cluster.k": k,
                "cluster.seed": seed,
                "evaluate.truth": truth or "none",
                "evaluate.seed": seed,
            },
        )
        log.info("select-backbone: %s on %d images", name, drawn)
        run_stages(cfg, ["embed", "cluster", "evaluate"], command="semclust select-backbone")
        with storage.using(storage_settings):
            metrics = storage.read_json(storage.join(run_dir, layout.METRICS))
            kmeans = [r for r in run_rows(run_dir, metrics, name) if r["clustering"] == "kmeans"]
        for r in kmeans:
            r["dim"] = get_backbone(name).dim
        rows.extend(kmeans)
    ranked = rank_backbones(rows, with_truth=truth is not None)
    result = {
        "input": input_uri,
        "sample": drawn,
        "k": k,
        "seed": seed,
        "truth": truth,
        "ranked_by": "mean of ACC and NMI against the truth"
        if truth is not None
        else "mean rank by cosine silhouette, k-means seed stability and kNN agreement "
        "(label-free)",
        "chosen": ranked[0]["backbone"] if ranked else None,
        "backbones": ranked,
    }
    with storage.using(storage_settings):
        storage.write_json(storage.join(out_dir, SELECTION_FILE), result)
    return result


# --- command line --------------------------------------------------------------------------------


def add_select_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="images: folder, s3:// prefix, manifest or tar shards")
    parser.add_argument("--out", required=True, help="folder (or s3://) for the sample and runs")
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=list(DEFAULT_BACKBONES),
        help=f"candidates (default: {' '.join(DEFAULT_BACKBONES)})",
    )
    parser.add_argument("--sample", type=int, default=2000, help="images drawn (default 2000)")
    parser.add_argument("-k", "--k", type=int, default=20, help="k-means clusters (default 20)")
    parser.add_argument(
        "--truth", help="rank by ACC/NMI against folder-names or a Parquet/CSV of uri,label"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and k-means")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config for every run, e.g. storage.endpoint_url=... or embed.device=gpu",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_select_backbone_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``semclust select-backbone``: prints the ranked table (or JSON) and the choice."""
    result = select_backbone(
        args.input,
        args.out,
        args.backbones,
        sample=args.sample,
        k=args.k,
        truth=args.truth,
        seed=args.seed,
        overrides=overrides,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [{key: r.get(key) for key in SHOWN} for r in result["backbones"]]
    print(format_table(rows, columns=[(key, key) for key in SHOWN]))
    print(f"ranked by {result['ranked_by']}, {result['sample']} images, k={result['k']}")
    print(f"chosen: --backbone {result['chosen']}")
    return 0
