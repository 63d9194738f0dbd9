"""widen's own errors: one base class, so the CLI and the worker tell a user's problem (one clear
line naming the field and the fix) from a bug (a traceback in stderr.log).

Every error widen raises on purpose derives from ``WidenError``. Most also derive from
``ValueError``, which they were before this base existed, so older ``except ValueError`` still
catches them.
"""

from __future__ import annotations


class WidenError(Exception):
    """A problem the user can fix; ``str(error)`` is the message, one line per problem."""


class RunStateError(WidenError, RuntimeError):
    """A run that cannot do what was asked in its current state (resume a running run, delete a
    queued one, a second worker on one run directory)."""


class UnsafeName(WidenError, ValueError):
    """A name from a plan or a run file that would become a path outside its directory."""


class RunCreateError(WidenError):
    """A run directory that could not be made (a full disk, a read-only runs root); nothing half
    made is left behind."""


class ModelLoadError(WidenError, ValueError):
    """A model source that cannot be read (`field`: the `[model]` field to fix, "source" by default)."""

    def __init__(self, message: str, field: str = "source"):
        super().__init__(message)
        self.field = field
