"""af3trt's user errors: one base class for everything a user can fix (a bad request, option, file).

`UserError` is what the CLI prints as one line and what servers answer as a bad request; anything
else that escapes is an internal error (a bug: the CLI prints its traceback). It derives from
ValueError so that callers catching ValueError keep working, but af3trt itself catches only
UserError where a user error is meant. No heavy imports here: every layer raises these.
"""

from __future__ import annotations


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


class MissingDependency(UserError, RuntimeError):
    """An optional NVIDIA package (tensorrt, tensorrt_llm) is not importable here."""


def lookup(registry, name: str, what: str):
    if name not in registry:
        raise OptionError(f"expected {what} in {sorted(registry)}, got {name!r}")
    return registry[name]
