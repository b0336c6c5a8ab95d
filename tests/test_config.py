from __future__ import annotations

import dataclasses

import pytest

from semclust.config import EmbedConfig, RunConfig, load_config, replace


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert cfg.embed.backbone == "resnet50"
    assert cfg.embed.normalize is True
    assert cfg.cluster.spherical is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed.batch_size = 3  # type: ignore[misc]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: /tmp/r\nembed:\n  backbone: efficientnet_lite0\n  batch_size: 8\n")
    cfg = load_config(path, {"embed.batch_size": "16", "cluster.k": 7, "embed.normalize": "false"})
    assert cfg.embed.backbone == "efficientnet_lite0"
    assert cfg.embed.batch_size == 16  # the flag wins over the file, and is coerced to int
    assert cfg.cluster.k == 7
    assert cfg.embed.normalize is False
    assert cfg.run_dir == "/tmp/r"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed.backbone": "vgg"}, "efficientnet_lite0, resnet50"),
        ({"embed.device": "tpu"}, "auto, cpu, gpu"),
        ({"embed.resize": "stretch"}, "center_crop, squash, pad"),
        ({"mode": "append"}, "resume, overwrite"),
        ({"graph.metric": "dot"}, "cosine, l2"),
        ({"cluster.k": 1}, "cluster.k must be >= 2"),
        ({"embed.batch_size": 0}, "embed.batch_size must be > 0"),
        ({"embed.batch_size": "many"}, "must be an integer"),
        ({"embed.batchsize": 3}, "allowed: input, backbone"),
        ({"clusters.k": 3}, "unknown config key(s) clusters"),
        ({"embed.max_actors": 1, "embed.num_actors": 2}, "max_actors"),
    ],
)
def test_bad_values_name_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_replace_revalidates():
    cfg = RunConfig()
    assert replace(cfg, **{"cluster.k": 5}).cluster.k == 5
    with pytest.raises(ValueError):
        replace(cfg, **{"cluster.k": 0})
    assert EmbedConfig().max_actors is None
