"""Labelling: reference images, seed labels and cluster names -> ``labels/``."""

from semclust.config import LabelConfig
from semclust.label.stage import run_label, run_label_command

__all__ = ["LabelConfig", "run_label", "run_label_command"]
