"""Ray job entrypoint for a whole run: ``semclust run`` with the job's arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config my-run.yaml

Inside a Ray job, RAY_ADDRESS is set, so the stages join the cluster instead of starting Ray.
"""

import sys

from semclust.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
