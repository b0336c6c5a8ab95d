"""Search from a run's index alone: by image id on the command line, and its refusals (an id
not in the index, no query, another backbone, embeddings redone with another backbone)."""

from __future__ import annotations

import json
import shutil

import pytest

from semclust.cli import main
from semclust.index.search import SearchIndex
from tests.index.helpers import index_cfg, run_index


def test_search_by_image_id_on_the_cli_and_refusals(ray_local, data, tmp_path, capsys):
    run_dir, _, _, ids = data
    work = tmp_path / "run"
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("index"))
    run_index(index_cfg(work, **{"index.type": "flat"}))
    shutil.rmtree(work / "embeddings")  # search needs index/ alone
    capsys.readouterr()
    code = main(["search", "--run-dir", str(work), "--image-id", str(ids[7]), "-k", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["query"] == f"image_id:{ids[7]}"
    assert out[0]["results"][0]["uri"] == "file:///synthetic/img-0000007.jpg"
    assert out[0]["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(out[0]["results"]) == 3
    assert main(["search", "--run-dir", str(work), "--image-id", "12345"]) == 2
    assert "image_id 12345 is not in this run's index" in capsys.readouterr().err
    assert main(["search", "--run-dir", str(work)]) == 2
    assert "search needs a query" in capsys.readouterr().err
    args = ["search", "--run-dir", str(work), "--image-id", "1", "--backbone", "resnet50"]
    assert main(args) == 2
    assert "holds efficientnet_lite0 embeddings, not resnet50" in capsys.readouterr().err
    # The run's embeddings were redone with another backbone: the index no longer matches.
    info = json.loads((work / "run.json").read_text())
    info["stages"]["embed"]["embedder"]["backbone"] = "resnet50"
    (work / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="built from efficientnet_lite0 embeddings"):
        SearchIndex(str(work))
