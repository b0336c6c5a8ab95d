"""`semclust serve` refuses what it cannot serve at once, with a message that says what to do."""

from __future__ import annotations

import socket

from semclust.cli import main


def test_serve_refusals(serve_run, tmp_path, capsys):
    assert main(["serve", "--run-dir", str(tmp_path), "--port", "0"]) == 2
    assert "has no complete index: run `semclust index` first" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--run-dir", str(serve_run), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    args = ["serve", "--run-dir", str(serve_run), "--set", "cluster.k=3"]
    assert main(args) == 2
    assert "only storage settings in --set, not cluster.k" in capsys.readouterr().err
    args = ["serve", "--run-dir", str(serve_run), "--assignments", "scan", "--port", "0"]
    assert main(args) == 2
    assert "has no assignments_scan/" in capsys.readouterr().err
    assert main(["serve", "--run-dir", str(serve_run), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be > 0" in capsys.readouterr().err
