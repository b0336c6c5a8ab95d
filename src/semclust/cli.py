"""``semclust <stage>``: one subcommand per stage, ``run`` for the main four, and the tools around
them (``refine``, ``label``, ``evaluate``, ``compare``, ``search``, ``report``, ``demo``).

Flags override the YAML config (``--config``), which overrides the defaults; ``--set key=value``
reaches any config field by its dotted name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any

from semclust import __version__

log = logging.getLogger("semclust")


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
        help="any config field by dotted name, e.g. --set embed.rows_per_part=512",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_section_flags(p: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """The flags of each config section's fields that declare one (``config.values.flag``)."""
    from semclust.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    seen: set[str] = set()
    for section in dict.fromkeys(sections):
        group = p.add_argument_group(f"{section} options")
        for f in dataclasses.fields(hints[section]):
            meta = f.metadata
            if "flag" not in meta or meta["flag"] in seen:
                continue
            seen.add(meta["flag"])
            dest = f"{section}.{f.name}"
            if meta["const"] is not None:
                group.add_argument(
                    meta["flag"],
                    dest=dest,
                    action="store_const",
                    const=meta["const"],
                    help=meta["help"],
                )
            else:
                parse = meta["parse"] or _parser_of(hints[section], f.name)
                group.add_argument(meta["flag"], dest=dest, type=parse, help=meta["help"])


def _parser_of(section: type, name: str) -> Any:
    """The argparse type of a field: its type, or the non-None member of ``X | None``."""
    tp = typing.get_type_hints(section)[name]
    members = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return members[0] if members[0] in (int, float, str) else str


def build_parser() -> argparse.ArgumentParser:
    from semclust import stages

    parser = argparse.ArgumentParser(
        prog="semclust",
        description="Images in object storage -> embeddings, clusters, a kNN graph and a "
        "searchable index, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"semclust {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_stages = [stages.by_name(name) for name in stages.RUN]
    p = sub.add_parser("run", help="the stages in order: " + ", ".join(stages.RUN))
    p.add_argument("input", nargs="?", help="image folder, file:// or s3:// prefix (none: demo)")
    _add_common(p)
    _add_section_flags(p, [stage.section for stage in run_stages])
    for command in stages.commands():
        spec = stages.for_command(command, stages.default_variant(command))
        p = sub.add_parser(command, help=spec.help)
        if spec.creates_run_dir:
            p.add_argument("input", nargs="?", help="image folder, file:// or s3:// prefix")
        _add_common(p)
        _add_section_flags(p, [spec.section])
    _add_tool_parsers(sub)
    return parser


def _add_tool_parsers(sub: Any) -> None:
    """The commands that are not stages: compare, select-backbone, search, serve, unlock, demo."""
    from semclust.compare import add_compare_arguments

    p = sub.add_parser("compare", help="several runs' metrics side by side")
    add_compare_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    from semclust.select_backbone import add_select_backbone_arguments

    p = sub.add_parser(
        "select-backbone", help="embed a sample with each backbone and rank them by score"
    )
    add_select_backbone_arguments(p)
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

    p = sub.add_parser(
        "add",
        help="add images to a finished run: same clusters (ids kept), index, graph and labels",
    )
    p.add_argument("input", help="image folder, file:// or s3:// prefix, manifest or tar shards")
    _add_common(p)
    _add_section_flags(p, ["add"])

    from semclust.serve.command import add_serve_parser

    add_serve_parser(sub)

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
            print(f"  {h.rank:>4}  {h.similarity:>10.4f}  {h.label}")


def print_records(records: dict[str, dict[str, Any]], *, details: bool = True) -> None:
    """One line per stage (its ``summary``), then any detail lines the stage gives."""
    from semclust import stages

    for name, record in records.items():
        stage = stages.by_name(name)
        summary = stage.summary(record)
        shown = name.replace("_", " ")
        head = summary if summary.startswith(stage.command) else f"{shown}: {summary}"
        print(f"{head} ({record.get('seconds', 0):.1f} s)")
        more = getattr(stage.implementation(), "details", None) if details else None
        for line in more(record) if more else []:
            print(f"  {line}")


def _print_demo(summary: dict[str, Any]) -> None:
    embed = summary["stages"]["embed"]
    print(f"demo images: {summary['images_dir']} ({summary['classes']} classes)")
    print(f"run directory: {summary['run_dir']}")
    print_records(summary["stages"], details=False)
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
    print(f"report: {summary['stages']['report']['uri']}")
    print(f"search and browse it in a browser: {summary['serve_command']}")


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
    from semclust.errors import SemclustError, remote_cause, without_ray_notes
    from semclust.retry import is_transient

    exc = remote_cause(exc)
    text = without_ray_notes(storage.redact(str(exc))) or type(exc).__name__
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


def _dispatch(args: argparse.Namespace) -> int:
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
    if args.command == "serve":
        from semclust.serve.command import run_serve_command

        return run_serve_command(args, _parse_set(args.set))
    if args.command == "compare":
        from semclust.compare import run_compare_command

        return run_compare_command(args)
    if args.command == "select-backbone":
        from semclust.select_backbone import run_select_backbone_command

        return run_select_backbone_command(args, _parse_set(args.set))
    if args.command == "add":
        from semclust.grow.stage import AddStage, add

        if args.mode == "overwrite":
            raise ValueError("add has no --mode overwrite: it only adds to a run")
        cli_args = argparse.Namespace(**{**vars(args), "input": None})
        record = add(config_from_args(cli_args), args.input)
        print(f"{AddStage().summary(record)} ({record.get('seconds', 0):.1f} s)")
        advice = (record.get("drift") or {}).get("advice")
        if advice:
            print(f"  drift: {advice}")
        if record.get("not_extended"):
            print(f"  not extended to the added images: {', '.join(record['not_extended'])}")
        return 0
    if args.command == "unlock":
        from semclust.lock import break_lock

        holder = break_lock(args.run_dir)
        print(f"removed the lock of {args.run_dir}: {holder}" if holder else "no lock held")
        return 0
    return _run_stage_command(args)


def _run_stage_command(args: argparse.Namespace) -> int:
    """``semclust run`` and every stage's subcommand: the stages under the contract."""
    from semclust import runner, stages

    cfg = config_from_args(args)
    if args.command == "run":
        names = list(stages.RUN)
    else:
        variant = getattr(getattr(cfg, args.command, None), "method", None)
        names = [stages.for_command(args.command, variant).name]
    records = runner.run_stages(cfg, names, "semclust " + args.command)
    print_records(records)
    print(f"run directory: {cfg.run_dir}")
    if "report" in records:
        print(f"report: {records['report']['uri']}")
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
