"""TensorFlow's C++ start-up notes kept off the terminal, its errors not.

TensorFlow 2.21 writes a few lines while it loads, before its own logging is set up, so
``TF_CPP_MIN_LOG_LEVEL`` cannot stop them: "All log messages before absl::InitializeLog() ...",
"Could not find cuda drivers on your machine" and, on a machine without a GPU, "failed call to
cuInit". Users read them as errors. ``install`` makes the first ``import tensorflow`` of the
process (from Keras, semclust or a Ray worker alike) run with file descriptor 2 sent to a
temporary file, together with TensorFlow's first look for GPUs (where cuInit is called); then
every line of that file that is not one of those notes is written to the real stderr, so an
error still shows. ``SEMCLUST_TF_NOTES=1`` leaves TensorFlow's output alone.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

NOTES = re.compile(
    r"absl::InitializeLog\(\)|cudart_stub\.cc|cuInit|cpu_feature_guard\.cc|"
    r"rebuild TensorFlow with the appropriate compiler flags|oneDNN custom operations|"
    r"TF-TRT Warning|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|cuda_(blas|dnn|fft)\.cc"
)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file in this block; afterwards its lines that are
    not TensorFlow's start-up ``NOTES`` go to the real stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                text = capture.read().decode("utf-8", errors="replace")
                kept = [line for line in text.splitlines(True) if not NOTES.search(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    finally:
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up notes filtered."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with native_stderr_filtered():
            self._loader.exec_module(module)
            with contextlib.suppress(Exception):  # only to say its cuInit line here
                module.config.list_physical_devices("GPU")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _QuietTensorflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Filter TensorFlow's start-up notes in this process (once; not if it is loaded already)."""
    if os.environ.get("SEMCLUST_TF_NOTES") == "1":
        return
    # Its INFO and WARNING lines after start-up (oneDNN, CPU features); errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorflow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorflow())
