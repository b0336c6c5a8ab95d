"""Ray job entrypoint of the laptop overlay: the demo images into object storage, then a run.

    python jobs/demo_job.py --demo-to s3://semclust-demo/images/ --demo-per-class 20 \
        --config my-run.yaml

Step one is ``jobs/demo_data.py`` (the bucket created when missing, the built-in demo set
uploaded to ``--demo-to``); step two is ``semclust run`` with every other argument, as
``jobs/pipeline.py``. Both steps in one command, so that all of it is the Ray job: KubeRay pastes
a RayJob's entrypoint unquoted into the submitter's shell line (``ray job submit ... --
<entrypoint> ; ...``), where ``A && B`` would submit only A and run B in the submitter pod.

The exit status is the upload's when it fails, else the CLI's (0 done, 2 bad config or input,
1 failed run). The ``--demo-*`` names keep clear of ``semclust run``'s own flags (``--seed``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import demo_data  # jobs/ is sys.path[0] when this file runs as a script

from semclust.cli import build_parser as cli_parser
from semclust.cli import main as cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo_job.py",
        description=__doc__.splitlines()[0],
        epilog="Every other argument goes to `semclust run`.",
        allow_abbrev=False,  # a prefix of a `semclust run` flag must reach `semclust run`
    )
    p.add_argument("--demo-to", required=True, help="where the demo images go: s3://bucket/prefix/")
    p.add_argument("--demo-per-class", type=int, default=20, help="images per class (default 20)")
    p.add_argument("--demo-seed", type=int, default=0)
    p.add_argument(
        "--demo-wait", type=float, default=120.0, help="seconds to wait for the store to answer"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, run_args = build_parser().parse_known_args(argv)
    cli_parser().parse_args(["run", *run_args])  # a wrong flag stops here, before the upload
    upload = [
        "--to",
        args.demo_to,
        "--per-class",
        str(args.demo_per_class),
        "--seed",
        str(args.demo_seed),
        "--wait",
        str(args.demo_wait),
    ]
    code = demo_data.main(upload)
    sys.stdout.flush()
    return code or cli_main(["run", *run_args])


if __name__ == "__main__":
    sys.exit(main())
