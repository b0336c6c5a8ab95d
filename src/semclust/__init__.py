"""semclust: embeddings, clusters, a kNN graph and a searchable index for millions of images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from semclust import quiet as _quiet

if TYPE_CHECKING:
    from semclust.config import RunConfig

__version__ = "0.1.0"

# TensorFlow's start-up notes off the terminal in every semclust process, Ray workers included.
_quiet.install()


def run(
    config: RunConfig | str | None = None,
    stages: Sequence[str] | None = None,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Run semclust from Python; see ``semclust.runner.run`` (imported on use: ``import semclust``
    stays light)."""
    from semclust.runner import run as run_stages

    return run_stages(config, stages, **overrides)
