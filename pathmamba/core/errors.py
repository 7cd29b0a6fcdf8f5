"""Errors the CLI reports as one line without a traceback: bad input, file-safety refusals, a full disk."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class DiskFull(OSError):
    """No space left (or the disk quota reached) writing a file; the message names the file, the bytes it
    needed and the bytes free. The CLI prints it without a traceback."""


#: The errors of a write that found no room: the device full, or the user's quota used up.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: Path, needed: int | None, about: bool = False) -> DiskFull:
    """The :class:`DiskFull` of writing ``needed`` bytes (``about``: an estimate; None: unknown) to ``path``."""
    folder = next(folder for folder in Path(path).absolute().parents if folder.exists())
    free = shutil.disk_usage(folder).free
    need = f"{'about ' if about else ''}{needed} bytes to write" if needed is not None else "more bytes to write"
    return DiskFull(f"{path}: disk full: {need}, {free} bytes free in {folder}; free some space there (or "
                    "give another folder) and run again")


class InputError(ValueError):
    """A bad argument or input file the user can fix (seeds given twice, an experiment folder that does not exist,
    data of another dataset). The message is one line naming it; the CLI prints it without a traceback and
    exits with status 2."""


class FileSafetyError(RuntimeError):
    """A refusal that protects files: a folder or file this tool did not write, or a checkpoint folder
    another trainer holds. The message is one line for the user (the CLI prints it without a traceback)."""


class DeviceUnavailable(RuntimeError):
    """A device setting this machine cannot follow (``cuda`` without a usable GPU); the message names the
    setting. The CLI prints it without a traceback."""


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became nan or infinite: the run has no result and writes none."""
