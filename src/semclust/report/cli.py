"""``semclust report --run-dir R`` (and ``python -m semclust.report``): flags and the command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from semclust.report.options import PROJECTIONS, ReportOptions

log = logging.getLogger(__name__)


def add_report_arguments(parser: argparse.ArgumentParser, *, include_common: bool = True) -> None:
    """Add the report's flags to ``parser``.

    ``include_common=False`` leaves out ``--run-dir``, ``--ray-address``, ``--num-cpus`` and
    ``-v``, for a parser that already has them (the ``semclust`` CLI's shared flags).
    """
    if include_common:
        parser.add_argument("--run-dir", required=True, help="run directory (local or s3://)")
        parser.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
        parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    d = ReportOptions()
    group = parser.add_argument_group("report options")
    group.add_argument("--out", help="report folder or s3:// prefix (default: <run-dir>/report)")
    group.add_argument(
        "--nearest", type=int, default=d.nearest, help=f"images nearest each centroid ({d.nearest})"
    )
    group.add_argument(
        "--sample", type=int, default=d.sample, help=f"random images per cluster ({d.sample})"
    )
    group.add_argument(
        "--clusters-per-page",
        type=int,
        default=d.clusters_per_page,
        help=f"cluster galleries per page ({d.clusters_per_page})",
    )
    group.add_argument(
        "--map-sample",
        type=int,
        default=d.map_sample,
        help=f"embeddings on the 2-D map, 0 for none ({d.map_sample})",
    )
    group.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default=d.projection,
        help="2-D map projection: auto (UMAP when umap-learn is installed, else PCA), pca, umap",
    )
    group.add_argument(
        "--report-seed", type=int, default=d.seed, help=f"seed of the samples ({d.seed})"
    )


def options_from_args(args: argparse.Namespace) -> ReportOptions:
    return ReportOptions(
        nearest=args.nearest,
        sample=args.sample,
        clusters_per_page=args.clusters_per_page,
        map_sample=args.map_sample,
        projection=args.projection,
        seed=args.report_seed,
    )


def run_report_command(args: argparse.Namespace) -> int:
    """Build the report from parsed arguments and print its URI; returns the exit code.

    Bad input (no run directory, no clusters yet, a bad option) raises ``ValueError`` for the
    caller to turn into exit code 2, as the ``semclust`` CLI does.
    """
    from semclust.config import RayConfig
    from semclust.report.build import build_report

    if not getattr(args, "run_dir", None):
        raise ValueError("no run directory given: pass --run-dir")
    ray_config = RayConfig(
        address=getattr(args, "ray_address", None), num_cpus=getattr(args, "num_cpus", None)
    )
    uri = build_report(
        args.run_dir, args.out, options=options_from_args(args), ray_config=ray_config
    )
    print(f"report: {uri}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semclust.report``: the same as ``semclust report`` (one parser, one exit-code
    mapping, in semclust.cli)."""
    from semclust.cli import main as semclust_main

    return semclust_main(["report", *(sys.argv[1:] if argv is None else argv)])
