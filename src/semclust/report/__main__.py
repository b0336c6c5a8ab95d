"""``python -m semclust.report --run-dir R``."""

import sys

from semclust.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
