"""The errors semclust stops with, each with the exit status the CLI gives it.

A stage raises one of these with a message that says what to do; the CLI prints the message
(the traceback only with ``-v``) and exits with ``exit_code``. Errors of other types are mapped
by ``semclust.cli`` (``ValueError``: bad input, 2; ``OSError``: a failed run, 1).
"""

from __future__ import annotations

import re


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


def remote_cause(exc: BaseException) -> BaseException:
    """The error inside Ray's wrappers (a task's or actor's error carries it as ``.cause``)."""
    seen = 0
    while type(exc).__module__.startswith("ray.") and seen < 5:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            # An actor whose __init__ raised: ActorDiedError keeps that task's error in args.
            cause = next((a for a in exc.args if isinstance(a, BaseException)), None)
        if cause is None:
            # Ray Data's UserCodeException ("UDF failed to process a data block") raises from
            # the task's own error.
            cause = exc.__cause__
        if cause is None:
            break
        exc, seen = cause, seen + 1
    return exc


# What Ray Data appends to an error from a task it retried: its own retry count and how to
# configure its retries, which is no advice for a semclust user.
_RAY_RETRY_NOTE = re.compile(r"\nFailed to .+ after \d+/\d+ attempts \(total backoff .*", re.S)


def without_ray_notes(text: str) -> str:
    """``text`` without the retry note Ray Data appends to an error from a task."""
    return _RAY_RETRY_NOTE.sub("", text)
