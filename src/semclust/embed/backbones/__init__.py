"""Backbones: image -> embedding models, one module per backbone (``semclust.registry`` lists
them).

A backbone module defines ``SPEC`` (a ``BackboneSpec``: input size, embedding dimension, where
its ImageNet weights come from) and ``build(input_size, weights_file, seed) -> keras.Model``
(float32 RGB in [0, 255] -> pooled features; ``weights_file`` None: a seeded random start).
``embed.weights`` is turned into that file by ``resolve_weights`` for every backbone alike, and
``build_embedding_model`` wraps the model to take uint8 pixels. Keras is imported only when a
model is built.
"""

from semclust.embed.backbones.model import Embedder, build_embedding_model, configure_keras_backend
from semclust.embed.backbones.spec import (
    WEIGHT_CHOICES,
    BackboneSpec,
    get_backbone,
    resolve_weights,
)

__all__ = [
    "WEIGHT_CHOICES",
    "BackboneSpec",
    "Embedder",
    "build_embedding_model",
    "configure_keras_backend",
    "get_backbone",
    "resolve_weights",
]
