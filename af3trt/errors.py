"""af3trt's user errors: one base class for everything a user can fix (a bad request, option, file).

`UserError` is what the CLI prints as one line and what servers answer as a bad request; anything
else that escapes is an internal error (a bug: the CLI prints its traceback). It derives from
ValueError so that callers catching ValueError keep working, but af3trt itself catches only
UserError where a user error is meant. No heavy imports here: every layer raises these.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import fileio


class UserError(ValueError):
    """A bad request, option or input file; the message says what was expected and what came."""


class OptionError(UserError):
    """An option (CLI flag, build / serving / generation option) outside what it accepts."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or that an input needs) is not there."""


class ExistingOutputError(UserError, FileExistsError):
    """An output path holds something af3trt will not replace."""


class OutputError(UserError, OSError):
    """An output path cannot be written (permissions, read-only or virtual file system)."""


def temp_dir_beside(final: str | os.PathLike, prefix: str) -> Path:
    """mkdtemp in `final`'s parent (created if needed), for an atomic rename onto `final`; a parent that
    cannot be written is an OutputError naming `final`, never the temporary name."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(fileio.mkdtemp(prefix=prefix, dir=final.parent))  # the umask's mode (renamed into place)
    except OSError as exc:
        raise OutputError(f"expected a writable folder to create {final} in, got {final.parent}: "
                          f"{exc.strerror or exc}") from exc
