"""Labelling: reference images, seed labels and cluster names -> ``labels/``."""

from semclust.label.stage import (
    LabelConfig,
    add_label_arguments,
    label_config_from_args,
    run_label,
    run_label_command,
)

__all__ = [
    "LabelConfig",
    "add_label_arguments",
    "label_config_from_args",
    "run_label",
    "run_label_command",
]
