"""Exclusive locks that the kernel releases when their process ends, however it ends (SIGKILL too):
``flock`` on a lock file. Used for a job's GPU slot (pathmamba/gpus.py) and a trainer's checkpoint
folder (pathmamba/train.py). No torch import."""

from __future__ import annotations

import fcntl
import os
import platform
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """Open ``path`` (created if absent) and lock it exclusively without waiting; returns the open
    descriptor, which holds the lock until it is closed or the process ends, with the holder (``pid N
    host H``) written into the file. None when another process holds the lock."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"pid {os.getpid()} host {platform.node()}\n".encode(), 0)
    return handle


def lock_holder(path: Path) -> str:
    """The holder that :func:`try_lock` wrote into the lock file ``path``."""
    try:
        return Path(path).read_text(errors="replace").strip() or "holder not written yet"
    except OSError:
        return "holder unknown"
