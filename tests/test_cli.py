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
            "embed.backbone='vgg16' is not allowed; choose one of efficientnet_lite0, resnet50",
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
