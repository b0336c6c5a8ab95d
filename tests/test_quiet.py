"""TensorFlow's start-up notes are dropped from file descriptor 2, and nothing else is."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys
from semclust.quiet import native_stderr_filtered
with native_stderr_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called ...\n")
    os.write(2, b"I0000 00:00:17 9953 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"E0000 00:00:17 9953 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
    os.write(2, b"F0000 real_op.cc:9] Check failed: a real error\n")
    print("a Python warning", file=sys.stderr)
print("after", file=sys.stderr)
"""


def test_only_the_start_up_notes_are_dropped():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "F0000 real_op.cc:9] Check failed: a real error\na Python warning\nafter\n"
    )
