"""``semclust <stage>``: one subcommand per stage, ``run`` for the main four, and the tools around
them (``refine``, ``label``, ``evaluate``, ``compare``, ``search``, ``report``, ``demo``).

Flags override the YAML config (``--config``), which overrides the defaults; ``--set key=value``
reaches any config field by its dotted name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from semclust import __version__

log = logging.getLogger("semclust")


def _k_value(text: str) -> int | str:
    """``--k``: an integer, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


# (flag, dotted config key, type, help) per stage; `run` takes all of them.
_STAGE_FLAGS: dict[str, list[tuple[str, str, Any, str]]] = {
    "embed": [
        ("--backbone", "embed.backbone", str, "backbone: resnet50 (default) or efficientnet_lite0"),
        (
            "--weights",
            "embed.weights",
            str,
            "imagenet | random | default (packaged weights) | path to a weights/.keras/.pth file",
        ),
        ("--image-size", "embed.image_size", int, "input size (default: the backbone's own)"),
        ("--resize", "embed.resize", str, "center_crop | squash | pad"),
        ("--batch-size", "embed.batch_size", int, "images per model call"),
        ("--num-actors", "embed.num_actors", int, "model actors (min of the pool)"),
        ("--max-actors", "embed.max_actors", int, "model actors (max of the pool)"),
        ("--rows-per-part", "embed.rows_per_part", int, "rows per embeddings shard"),
        ("--device", "embed.device", str, "auto | cpu | gpu"),
        ("--keras-backend", "embed.keras_backend", str, "tensorflow | jax | torch"),
    ],
    "cluster": [
        ("--k", "cluster.k", _k_value, "number of clusters, or 'auto' (k_min..k_max on a sample)"),
        ("--k-min", "cluster.k_min", int, "--k auto: smallest k tried (default 2)"),
        ("--k-max", "cluster.k_max", int, "--k auto: largest k tried (default 50)"),
        ("--niter", "cluster.niter", int, "k-means iterations"),
        ("--nredo", "cluster.nredo", int, "k-means restarts (best objective kept)"),
        ("--init", "cluster.init", str, "kmeans++ (default, greedy) | random"),
        ("--seed", "cluster.seed", int, "k-means seed"),
        (
            "--max-points-per-centroid",
            "cluster.max_points_per_centroid",
            int,
            "training sample: at most this x k rows (default 256)",
        ),
        ("--pca-dim", "cluster.pca_dim", int, "cluster on this many principal components"),
        ("--whiten", "cluster.whiten", bool, "whiten the principal components"),
        ("--hierarchical", "cluster.hierarchical", str, "two-level k-means: auto | on | off"),
        ("--assign-actors", "cluster.num_actors", int, "Ray actors assigning rows"),
        ("--cluster-device", "cluster.device", str, "auto | cpu | gpu"),
    ],
    "graph": [
        ("--knn-k", "graph.k", int, "neighbours per image in the kNN graph"),
        ("--metric", "graph.metric", str, "cosine | l2"),
        ("--graph-method", "graph.method", str, "auto | exact | ivf | hnsw"),
        ("--graph-nprobe", "graph.nprobe", int, "IVF lists searched per query"),
        ("--graph-nlist", "graph.nlist", int, "IVF lists (default about 4 sqrt(N))"),
        ("--fp16", "graph.fp16", bool, "GPU exact graph: store vectors in float16"),
        ("--min-recall", "graph.min_recall", float, "fail an approximate graph below this"),
        (
            "--duplicate-threshold",
            "graph.duplicate_threshold",
            str,
            "edges with similarity >= this form near-duplicate groups (none: skip)",
        ),
        ("--graph-actors", "graph.num_actors", int, "Ray actors answering kNN queries"),
        ("--graph-device", "graph.device", str, "auto | cpu | gpu"),
    ],
    "index": [
        ("--index-type", "index.type", str, "auto | flat | ivf_flat | ivf_pq | hnsw"),
        ("--index-memory", "index.memory", str, "memory budget for the index, e.g. 8GB"),
        ("--index-nlist", "index.nlist", int, "IVF lists (default about 4 sqrt(N))"),
        ("--index-nprobe", "index.nprobe", int, "default IVF lists searched per query"),
        ("--pq-m", "index.pq_m", int, "IVF-PQ bytes per vector (default: most that fit)"),
        ("--index-device", "index.device", str, "auto | cpu | gpu"),
    ],
    "refine": [
        ("--method", "refine.method", str, "scan (default) | dec"),
        ("--k", "refine.k", int, "clusters (default: the k-means model's k)"),
        ("--epochs", "refine.epochs", int, "SCAN training epochs (default 30)"),
        ("--heads", "refine.heads", int, "SCAN heads trained at once; the lowest loss is kept"),
        ("--hidden", "refine.hidden", int, "width of the shared hidden layer (0: linear heads)"),
        ("--entropy-weight", "refine.entropy_weight", float, "SCAN balance term weight (5.0)"),
        ("--num-neighbors", "refine.num_neighbors", int, "SCAN: graph neighbours per row (20)"),
        ("--self-label-epochs", "refine.self_label_epochs", int, "SCAN self-labelling (0: skip)"),
        (
            "--confidence-threshold",
            "refine.confidence_threshold",
            float,
            "self-labelling trains on rows at least this confident (0.99)",
        ),
        ("--batch-size", "refine.batch_size", int, "rows (SCAN: pairs) per step (512)"),
        ("--learning-rate", "refine.learning_rate", float, "Adam learning rate (SCAN)"),
        ("--dec-tolerance", "refine.dec_tolerance", float, "DEC stops below this change rate"),
        ("--dec-max-epochs", "refine.dec_max_epochs", int, "DEC passes over the data at most"),
        ("--seed", "refine.seed", int, "training seed"),
        ("--refine-device", "refine.device", str, "auto | cpu | gpu"),
    ],
    "label": [
        ("--refs", "label.refs", str, "folder/URI with one sub-folder of example images per class"),
        ("--seed-labels", "label.seed_labels", str, "Parquet/CSV of uri,label (labelled subset)"),
        ("--names", "label.names", str, "YAML mapping cluster id -> name"),
        (
            "--assignments",
            "label.assignments",
            str,
            "clusters to label or name: kmeans (default) | scan | dec | auto (best present)",
        ),
        ("--min-confidence", "label.min_confidence", float, "lower confidence -> unknown"),
        (
            "--unknown-threshold",
            "label.unknown_threshold",
            float,
            "refs: cosine under which an image is unknown (default: per class, automatic)",
        ),
        ("--vote-k", "label.vote_k", int, "refs: graph neighbours in each image's vote (10)"),
        (
            "--label-method",
            "label.method",
            str,
            "seed labels: auto (best cross-validated) | head | propagation | blend",
        ),
        ("--cv-folds", "label.cv_folds", int, "seed labels: cross-validation folds (5)"),
        ("--label-seed", "label.seed", int, "seed of the head and the folds"),
    ],
}


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _add_common(p: argparse.ArgumentParser, *, needs_run_dir: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument(
        "--run-dir",
        required=False,
        help="run directory (local path or s3:// prefix)"
        + (" [required]" if needs_run_dir else ""),
    )
    p.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field by dotted name, e.g. --set embed.decode_batch_size=128",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_stage_flags(p: argparse.ArgumentParser, stages: Sequence[str]) -> None:
    for stage in stages:
        group = p.add_argument_group(f"{stage} options")
        for flag, key, tp, help_text in _STAGE_FLAGS[stage]:
            if tp is bool:
                group.add_argument(flag, dest=key, action="store_const", const=True, help=help_text)
            else:
                group.add_argument(flag, dest=key, type=tp, help=help_text)
    if "embed" in stages:
        p.add_argument(
            "--no-normalize",
            dest="embed.normalize",
            action="store_const",
            const=False,
            help="keep raw embeddings (default: L2-normalised)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semclust",
        description="Images in object storage -> embeddings, clusters, a kNN graph and a "
        "searchable index, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"semclust {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="all stages in order: embed, cluster, graph, index")
    p.add_argument("input", nargs="?", help="image folder, file:// or s3:// prefix (none: demo)")
    _add_common(p)
    _add_stage_flags(p, ["embed", "cluster", "graph", "index"])

    p = sub.add_parser("embed", help="images -> embeddings/ and failures/")
    p.add_argument("input", nargs="?", help="image folder, file:// or s3:// prefix")
    _add_common(p)
    _add_stage_flags(p, ["embed"])

    for stage, help_text in (
        ("cluster", "embeddings/ -> model/ and assignments/ (FAISS k-means)"),
        ("graph", "embeddings/ -> knn/ and duplicates/ (FAISS kNN graph, exact or IVF/HNSW)"),
        ("index", "embeddings/ -> index/ (FAISS index sized to N and --index-memory)"),
    ):
        p = sub.add_parser(stage, help=help_text)
        _add_common(p)
        _add_stage_flags(p, [stage])

    p = sub.add_parser(
        "refine", help="SCAN or DEC head on embeddings (+ knn/) -> assignments_scan|dec/"
    )
    _add_common(p)
    _add_stage_flags(p, ["refine"])

    p = sub.add_parser("label", help="labels/ from reference images, seed labels or cluster names")
    _add_common(p)
    _add_stage_flags(p, ["label"])

    from semclust.compare import add_compare_arguments
    from semclust.evaluate import add_evaluate_arguments

    p = sub.add_parser(
        "evaluate", help="metrics.json: scores against known classes, and label-free scores"
    )
    _add_common(p)
    add_evaluate_arguments(p)

    p = sub.add_parser("compare", help="several runs' metrics side by side")
    add_compare_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("search", help="nearest images to query images, from a run's index")
    p.add_argument("--run-dir", required=True, help="run directory with an index/")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="query image file, URI (s3://...) or folder of images (repeat)",
    )
    p.add_argument(
        "--image-id",
        action="append",
        type=int,
        default=[],
        help="query by the image_id of an image in the index (repeat)",
    )
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--nprobe", type=int, help="IVF lists searched (default: the index's own)")
    p.add_argument("--ef-search", type=int, help="HNSW search depth (default: the index's own)")
    p.add_argument("--backbone", help="refuse the run unless its index holds this backbone")
    p.add_argument("--device", default="auto", help="auto | cpu | gpu (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    from semclust.report.cli import add_report_arguments

    p = sub.add_parser(
        "report", help="static HTML review report: cluster galleries, 2-D map, failures"
    )
    add_report_arguments(p)

    p = sub.add_parser(
        "unlock", help="remove a run directory's lock (only when the run holding it is gone)"
    )
    p.add_argument("--run-dir", required=True, help="run directory (local path or s3:// prefix)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("demo", help="build the demo image set and run everything on it")
    p.add_argument("--out", default="semclust-demo", help="output folder (default ./semclust-demo)")
    p.add_argument("--per-class", type=int, default=20, help="images per class (default 20)")
    p.add_argument("--weights", default="default", help="efficientnet_lite0 weights")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    from semclust.config import load_config

    overrides: dict[str, Any] = _parse_set(getattr(args, "set", []))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            overrides[key] = value
    for attr, key in (
        ("run_dir", "run_dir"),
        ("mode", "mode"),
        ("ray_address", "ray.address"),
        ("num_cpus", "ray.num_cpus"),
        ("input", "embed.input"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    cfg = load_config(args.config, overrides)
    if not cfg.run_dir:
        raise ValueError("no run directory given: pass --run-dir (or set run_dir in the config)")
    from semclust import storage

    # Before any storage call: the workers get these options with their tasks.
    storage.configure_s3(storage.s3_options_from_config(cfg.storage))
    return cfg


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("ray", "absl", "tensorflow", "h5py", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_hits(queries: list[str], results: list[list[Any]], as_json: bool) -> None:
    if as_json:
        out = [
            {"query": q, "results": [h.__dict__ for h in hits]}
            for q, hits in zip(queries, results, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return
    for q, hits in zip(queries, results, strict=True):
        print(f"query: {q}")
        print(f"  {'rank':>4}  {'similarity':>10}  uri")
        for h in hits:
            print(f"  {h.rank:>4}  {h.similarity:>10.4f}  {h.uri}")


def _print_stage_summary(records: dict[str, dict[str, Any]]) -> None:
    print(f"{'stage':<8} {'seconds':>8}  summary")
    for stage, rec in records.items():
        if stage == "embed":
            detail = (
                f"listed {rec['listed']}, embedded {rec['embedded']}, failed {rec['failed']}, "
                f"{rec['images_per_second'] or '-'} img/s"
            )
        elif stage == "cluster":
            detail = f"k={rec['k']}, sizes {rec['cluster_sizes']}"
        elif stage == "graph":
            detail = f"k={rec['k']} {rec['method']}, {rec['rows']} rows"
            if rec.get("recall"):
                detail += f", recall@k {rec['recall']['recall_at_k']}"
            if rec.get("duplicates"):
                detail += f", {rec['duplicates']['groups']} duplicate groups"
        else:
            detail = f"{rec.get('factory', rec['type'])} {rec['metric']}, {rec['count']} vectors"
            if rec.get("recall_at_10") is not None:
                detail += f", recall@10 {rec['recall_at_10']}"
        print(f"{stage:<8} {rec['seconds']:>8.1f}  {detail}")


def _print_demo(summary: dict[str, Any]) -> None:
    embed = summary["stages"]["embed"]
    print(f"demo images: {summary['images_dir']} ({summary['classes']} classes)")
    print(f"run directory: {summary['run_dir']}")
    _print_stage_summary(summary["stages"])
    sizes = ", ".join(f"{c}:{n}" for c, n in summary["cluster_sizes"].items())
    print(f"cluster sizes: {sizes}")
    m = summary["metrics"]
    print(
        f"k-means vs true classes: NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}  ACC {m['acc']:.3f}  "
        f"(n={m['n']}; {embed['failed']} unusable files are in failures/)"
    )
    print(f"search for {summary['query']}:")
    for h in summary["hits"]:
        print(f"  {h['rank']:>2}  {h['similarity']:.4f}  {h['uri']}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``semclust`` command: every error ends as one message and an exit status (2: bad
    input or config, 1: a failed run, 130: Ctrl-C, 143: SIGTERM); ``-v`` adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose)
    previous = _terminate_as_interrupt()
    try:
        return _dispatch(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        code, message = explain(exc)
        if verbose:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"semclust: {'error' if code == 2 else 'failed'}: {message}", file=sys.stderr)
        return code
    finally:
        _restore_terminate(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a pod or job being stopped): handled as Ctrl-C is, with exit status 143."""


def _terminate_as_interrupt() -> Any:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_terminate(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def explain(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message that says what to do) for an error that stopped a run."""
    import errno

    from semclust import storage
    from semclust.errors import SemclustError
    from semclust.retry import is_transient

    exc = _remote_cause(exc)
    text = storage.redact(str(exc)) or type(exc).__name__
    again = "run the same command again (--mode resume) to go on"
    resume = f"committed work is kept: {again}"
    if isinstance(exc, KeyboardInterrupt):
        code = 143 if isinstance(exc, Terminated) else 130
        return code, f"interrupted; {resume}"
    if isinstance(exc, SemclustError):
        return exc.exit_code, text
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)):
        return 2, text
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, f"no space left on the device: {text}; free space, then {again}"
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EROFS):
            return 2, f"permission denied: {text}; check who may write the run directory"
        if is_transient(exc):
            return 1, f"the store was unreachable: {text}; {resume}"
        return 1, f"{text}; {resume}"
    if isinstance(exc, RuntimeError):
        return 1, text
    return 1, f"{type(exc).__name__}: {text} (a bug in semclust: run with -v and report it)"


def _remote_cause(exc: BaseException) -> BaseException:
    """The user's error inside Ray's wrappers (a task's or actor's error carries it as .cause)."""
    seen = 0
    while type(exc).__module__.startswith("ray.") and seen < 5:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            break
        exc, seen = cause, seen + 1
    return exc


def _dispatch(args: argparse.Namespace) -> int:
    from semclust import runner

    if args.command == "demo" or (
        args.command == "run" and not args.run_dir and not _has_input(args)
    ):
        from semclust.demo import run_demo

        summary = run_demo(
            getattr(args, "out", "semclust-demo"),
            per_class=getattr(args, "per_class", 20),
            weights=getattr(args, "weights", None) or "default",
            num_cpus=args.num_cpus,
        )
        if getattr(args, "json", False):
            print(json.dumps(summary, indent=2, default=str))
        else:
            _print_demo(summary)
        return 0
    if args.command == "search":
        from semclust.index.search import SearchIndex, expand_queries

        if not args.image and not args.image_id:
            raise ValueError("search needs a query: pass --image (file, URI, folder) or --image-id")
        if args.k < 1:
            raise ValueError(f"-k must be >= 1, got {args.k}")
        if args.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"--device={args.device!r} is not allowed; choose auto, cpu or gpu")
        images = expand_queries(args.image) if args.image else []
        index = SearchIndex(
            args.run_dir,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            backbone=args.backbone,
            device=args.device,
        )
        results = index.search_images(images, args.k) if images else []
        if args.image_id:
            results += index.search_ids(args.image_id, args.k)
        queries = images + [f"image_id:{i}" for i in args.image_id]
        _print_hits(queries, results, args.json)
        return 0
    if args.command == "report":
        from semclust.report.cli import run_report_command

        with runner.holding_run_dir(args.run_dir or "", "semclust report", must_exist=True):
            return run_report_command(args)
    if args.command == "compare":
        from semclust.compare import run_compare_command

        return run_compare_command(args)
    if args.command == "unlock":
        from semclust.lock import break_lock

        holder = break_lock(args.run_dir)
        print(f"removed the lock of {args.run_dir}: {holder}" if holder else "no lock held")
        return 0
    cfg = config_from_args(args)
    command = "semclust " + args.command
    if args.command in ("evaluate", "refine", "label"):
        with runner.holding_run_dir(cfg.run_dir, command, must_exist=True):
            if args.command == "evaluate":
                from semclust.evaluate import run_evaluate_command

                return run_evaluate_command(args)
            if args.command == "refine":
                from semclust.clustering.refine import run_refine_command

                return run_refine_command(cfg)
            from semclust.label.stage import run_label_command

            return run_label_command(cfg)
    report_uri = None
    if args.command == "run":
        from semclust.report import build_report

        with runner.holding_run_dir(cfg.run_dir, command) as lock:
            records = runner.run_stages(cfg, runner.STAGE_ORDER, command, lock)
            report_uri = build_report(cfg.run_dir, ray_config=cfg.ray)
    else:
        records = runner.run_stages(cfg, [args.command], command)
    _print_stage_summary(records)
    print(f"run directory: {cfg.run_dir}")
    if report_uri:
        print(f"report: {report_uri}")
    return 0


def _has_input(args: argparse.Namespace) -> bool:
    if getattr(args, "input", None):
        return True
    if getattr(args, "config", None):
        from semclust.config import load_config

        return bool(load_config(args.config).embed.input)
    return any(s.startswith("embed.input=") for s in getattr(args, "set", []))


if __name__ == "__main__":
    sys.exit(main())
