from __future__ import annotations

import dataclasses

import pytest

from semclust.config import EmbedConfig, RunConfig, load_config, parse_bytes, replace


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
        (
            {"embed.backbone": "vgg"},
            "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50",
        ),
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


def test_cluster_k_is_an_integer_or_auto():
    assert load_config(None, {"cluster.k": "auto"}).cluster.k == "auto"
    assert load_config(None, {"cluster.k": "12"}).cluster.k == 12  # the CLI passes strings
    for bad, message in (
        ("many", "an integer >= 2 or 'auto'"),
        (1, "cluster.k must be >= 2"),
        ({"x": 1}, "cluster.k must be an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(None, {"cluster.k": bad})
    with pytest.raises(ValueError, match=r"cluster\.k_max \(5\) must be >= cluster\.k_min \(10\)"):
        load_config(None, {"cluster.k_min": 10, "cluster.k_max": 5})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 << 30), ("8GiB", 8 << 30), ("512 MB", 512 << 20), ("1.5G", 3 << 29), (4096, 4096)],
)
def test_memory_sizes(text, expected):
    assert parse_bytes(text) == expected
    assert load_config(None, {"index.memory": text}).index.memory == str(text)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"index.memory": "lots"}, "index.memory='lots' is not a size"),
        ({"index.memory": "0GB"}, "is not a size"),
        ({"index.type": "lsh"}, "auto, flat, ivf_flat, ivf_pq, hnsw"),
        ({"graph.method": "annoy"}, "auto, exact, ivf, hnsw"),
        ({"cluster.init": "kmeans||"}, "kmeans++, random"),
        ({"cluster.hierarchical": "yes"}, "auto, on, off"),
        ({"graph.min_recall": 1.5}, "graph.min_recall must be in [0, 1]"),
        ({"graph.nprobe": 0}, "graph.nprobe must be > 0"),
        ({"cluster.pca_dim": 0}, "cluster.pca_dim must be > 0"),
        ({"refine.method": "kmeans"}, "refine.method='kmeans' is not allowed; choose one of scan"),
        ({"refine.confidence_threshold": 1}, "refine.confidence_threshold must be in (0, 1)"),
        ({"label.method": "svm"}, "auto, head, propagation, blend"),
        ({"label.assignments": "gmm"}, "kmeans, scan, dec, auto"),
        ({"label.refs": "r", "label.seed_labels": "s"}, "--refs or --seed-labels, not both"),
        ({"storage.endpoint_url": "minio:9000"}, "must look like http(s)://host[:port]"),
        ({"storage.anonymous": True, "storage.profile": "p"}, "exclude each other"),
        ({"storage.access_key": "AKIA..."}, "allowed: endpoint_url, region, profile, anonymous"),
        ({"embed.precision": "bf16"}, "auto, float32, mixed"),
        ({"embed.threads": 0}, "embed.threads must be > 0"),
        ({"embed.weights_sha256": "abc"}, "64 hexadecimal digits"),
        ({"ray.object_store_memory": "10MB"}, "below Ray's minimum of 78 MiB"),
        ({"ray.object_store_memory": "lots"}, "ray.object_store_memory='lots' is not a size"),
    ],
)
def test_stage_values_name_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_none_disables_optional_stage_settings():
    cfg = load_config(None, {"graph.duplicate_threshold": "none", "graph.min_recall": "null"})
    assert cfg.graph.duplicate_threshold is None and cfg.graph.min_recall is None
    assert load_config(None, {"graph.duplicate_threshold": "0.9"}).graph.duplicate_threshold == 0.9


def test_refine_label_and_storage_sections_load_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "refine:\n  method: dec\n  dec_tolerance: 0.01\n"
        "label:\n  seed_labels: s3://b/labels.csv\n  method: propagation\n"
        "storage:\n  endpoint_url: http://127.0.0.1:9000\n  anonymous: yes\n"
        "embed:\n  precision: mixed\n  xla: true\n  threads: 4\n"
    )
    cfg = load_config(path, {"refine.k": "12"})
    assert (cfg.refine.method, cfg.refine.dec_tolerance, cfg.refine.k) == ("dec", 0.01, 12)
    assert cfg.label.seed_labels == "s3://b/labels.csv" and cfg.label.method == "propagation"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000" and cfg.storage.anonymous is True
    assert (cfg.embed.precision, cfg.embed.xla, cfg.embed.threads) == ("mixed", True, 4)
