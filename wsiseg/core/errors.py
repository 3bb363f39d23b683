"""Errors that the command line turns into a one-line message and a distinct exit code.

Every error a user can cause (a missing file, a corrupt slide, a bad config value, an unwritable output) is raised
as a :class:`WsisegError` subclass; anything else is a bug and keeps its traceback (shown with ``--debug``).
"""

from __future__ import annotations


class WsisegError(Exception):
    """Base class: ``str(err)`` is the one-line message, ``exit_code`` the process exit status."""

    exit_code = 1


class ConfigError(WsisegError, ValueError):
    """An invalid configuration file or value, or conflicting command-line options."""

    exit_code = 2


class InputError(WsisegError):
    """An input path is missing, of the wrong kind, unsupported, or corrupt."""

    exit_code = 3


class NoMPPError(InputError):
    """The slide declares no microns-per-pixel and none was given."""

    exit_code = 4


class OutputError(WsisegError):
    """An output cannot be written (exists without --overwrite, unwritable directory, disk full)."""

    exit_code = 5


class ModelError(WsisegError):
    """A model/checkpoint file that is not one, is unsafe, or is for another architecture."""

    exit_code = 6


class ProcessDied(WsisegError):
    """A helper process of a run died (killed from outside, out of memory): like an interrupted run, its progress
    is kept for ``--resume``."""


def missing_path(p) -> "InputError":
    """The error for a path that does not lead to a file: missing, a broken symbolic link, or a link loop."""
    import errno
    import os
    from pathlib import Path

    p = Path(p)
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return InputError(f"{p}: symbolic link loop")
        if p.is_symlink():
            return InputError(f"{p}: broken symbolic link (to {os.readlink(p)})")
    return InputError(f"{p}: no such file")
