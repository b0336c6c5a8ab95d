"""Ray job entrypoint for a whole run: ``semclust run`` with the job's arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config my-run.yaml

Inside a Ray job, RAY_ADDRESS is set, so the stages join the cluster instead of starting Ray. The
exit status is the CLI's (0 done, 2 bad config or input, 1 failed run), so the job ends
SUCCEEDED or FAILED with the reason in its logs. Submitting the same config again resumes the
run: committed shards are skipped.

Runtime environment: the nodes need semclust installed, from the image in kubernetes/Dockerfile,
by the cluster launcher configs in cluster/, or shipped with the job by
``--runtime-env jobs/runtime_env.yaml`` (package source plus pip dependencies) on a stock Ray
2.60 image. S3 settings come from the standard AWS variables of the nodes, or with the job:
``--runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "...", "AWS_REGION": "..."}}'``.
"""

import sys

from semclust.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
