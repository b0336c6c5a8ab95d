"""The CLI's contract: useful --help, and bad input stops at once with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _semclust(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semclust.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_stage():
    proc = _semclust("--help")
    assert proc.returncode == 0
    for command in ("run", "embed", "cluster", "graph", "index", "search", "demo", "evaluate"):
        assert command in proc.stdout
    proc = _semclust("embed", "--help")
    assert "--backbone" in proc.stdout and "--weights" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "{tmp}/missing", "--run-dir", "{tmp}/r"], "does not exist"),
        (["embed", "{tmp}/empty", "--run-dir", "{tmp}/r"], "no images found under"),
        (
            ["embed", "{tmp}/empty", "--run-dir", "{tmp}/r", "--backbone", "vgg16"],
            "embed.backbone='vgg16' is not allowed; choose one of efficientnet_lite0, "
            "efficientnet_lite1, efficientnet_lite2, resnet50",
        ),
        (["embed", "{tmp}/empty"], "no run directory given"),
        (["cluster", "--run-dir", "{tmp}/r"], "no embeddings under"),
        (
            ["embed", "{tmp}/empty", "--run-dir", "{tmp}/r", "--set", "embed.bogus=1"],
            "unknown config key(s) embed.bogus",
        ),
        (
            ["embed", "{tmp}/empty", "--run-dir", "{tmp}/r", "--weights", "{tmp}/none.h5"],
            "is not 'imagenet', 'random', 'default' or an existing file",
        ),
        (["search", "--run-dir", "{tmp}/r", "--image", "{tmp}/q.jpg"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    proc = _semclust(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_error_maps_to_one_message_and_its_exit_status(tmp_path):
    """`explain` on real errors of each kind a run can stop with."""
    import errno

    from semclust.cli import Terminated, explain
    from semclust.errors import RunDirLocked, StoreUnavailable

    def raised(fn) -> BaseException:
        try:
            fn()
        except BaseException as exc:
            return exc
        raise AssertionError("nothing raised")

    target = tmp_path / "file"
    target.write_text("x")
    cases = [
        (raised(lambda: (target / "sub").mkdir()), 2, "Not a directory"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left on the device"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "free space, then run the same"),
        (OSError(errno.ECONNREFUSED, "Connection refused"), 1, "the store was unreachable"),
        (PermissionError(errno.EACCES, "Permission denied", "/r"), 2, "permission denied"),
        (StoreUnavailable("3 of 9 images could not be read"), 1, "3 of 9 images"),
        (RunDirLocked("run directory r is in use by another run"), 2, "in use"),
        (KeyboardInterrupt(), 130, "interrupted; committed work is kept"),
        (Terminated(), 143, "interrupted"),
        (RuntimeError("the pipeline lost rows"), 1, "the pipeline lost rows"),
        (TypeError("'NoneType' object is not iterable"), 1, "a bug in semclust"),
    ]
    for exc, code, words in cases:
        got_code, message = explain(exc)
        assert (got_code, words in message) == (code, True), (exc, got_code, message)
        assert "\n" not in message


def test_unlock_removes_a_stale_lock_and_says_whose_it_was(tmp_path):
    from semclust.lock import RunDirLock

    run = tmp_path / "run"
    lock = RunDirLock(str(run), command="semclust embed")
    lock.acquire()
    proc = _semclust("unlock", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "removed the lock" in proc.stdout and "semclust embed" in proc.stdout
    assert not (run / "run.lock").exists()
    lock.release()
    assert "no lock held" in _semclust("unlock", "--run-dir", str(run)).stdout
