"""Starting a local Ray from the run config (in a fresh process: Ray starts once per process)."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import json, ray
from semclust.config import RayConfig
from semclust.ray_runtime import ensure_ray
ensure_ray(RayConfig(num_cpus=1, object_store_memory="300MB"))
res = ray.cluster_resources()
print(json.dumps({"cpu": res["CPU"], "store": res["object_store_memory"]}))
ray.shutdown()
"""


def test_local_ray_gets_the_configured_cpus_and_object_store():
    env = {"RAY_ADDRESS": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cpu"] == 1
    assert out["store"] == 300 * 2**20
