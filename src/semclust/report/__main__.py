"""``python -m semclust.report --run-dir R``: the same as ``semclust report``."""

import sys


def main() -> int:
    from semclust.cli import main as semclust_main  # here, not above: cli imports the stages

    return semclust_main(["report", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
