"""The errors semclust stops with, each with the exit status the CLI gives it.

A stage raises one of these with a message that says what to do; the CLI prints the message
(the traceback only with ``-v``) and exits with ``exit_code``. Errors of other types are mapped
by ``semclust.cli`` (``ValueError``: bad input, 2; ``OSError``: a failed run, 1).
"""

from __future__ import annotations


class SemclustError(Exception):
    """Base of semclust's own errors."""

    exit_code = 1


class UserError(SemclustError, ValueError):
    """Bad input or configuration: nothing ran, fix the input and run again."""

    exit_code = 2


class RunFailed(SemclustError, RuntimeError):
    """The run stopped part-way; committed work is kept and ``--mode resume`` goes on."""

    exit_code = 1


class StoreUnavailable(RunFailed):
    """Object storage (or a disk) could not be reached for longer than the retry budget."""


class RunDirLocked(SemclustError):
    """Another run holds the run directory."""

    exit_code = 2
