"""A separate process that takes a run directory's lock and holds it (for tests/test_lock.py).

    python tests/lockholder.py RUN_DIR [--hold S] [--heartbeat S] [--stale S] [--host NAME]
                               [--go PATH] [--stop PATH]

Prints ``READY`` once imported (the lock object built), waits for ``--go`` to exist, then prints
``ACQUIRED <pid>`` or ``LOCKED <message>``; a winner holds the lock until ``--hold`` seconds pass
or ``--stop`` exists, releases it and prints ``RELEASED``. ``--host`` pretends to run on another
host, so that only the heartbeat keeps the lock fresh.
"""

from __future__ import annotations

import argparse
import os
import time

from semclust import lock
from semclust.errors import RunDirLocked


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--hold", type=float, default=60.0)
    p.add_argument("--heartbeat", type=float, default=15.0)
    p.add_argument("--stale", type=float, default=90.0)
    p.add_argument("--host")
    p.add_argument("--go")
    p.add_argument("--stop")
    args = p.parse_args()
    if args.host:
        lock._HOST = args.host
    held = lock.RunDirLock(
        args.run_dir,
        command="lockholder",
        heartbeat_seconds=args.heartbeat,
        stale_seconds=args.stale,
    )
    print("READY", flush=True)
    while args.go and not os.path.exists(args.go):
        time.sleep(0.002)
    try:
        held.acquire()
    except RunDirLocked as exc:
        print("LOCKED", str(exc).replace("\n", " "), flush=True)
        return 0
    print("ACQUIRED", os.getpid(), flush=True)
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline and not (args.stop and os.path.exists(args.stop)):
        time.sleep(0.02)
    held.release()
    print("RELEASED", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
