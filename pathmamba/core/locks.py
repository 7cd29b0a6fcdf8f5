"""Exclusive locks that the kernel releases when their process ends, however it ends (SIGKILL too):
``flock`` on a lock file. Used for a job's GPU slot (pathmamba/core/gpus.py), a trainer's checkpoint
folder (pathmamba/engine/train.py) and a Snakemake run's results folder (workflow/rules/common.smk). No torch
import."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import time
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


# --- the experiment lock: one Snakemake at a time writes into <results_dir>/<experiment> ---------------------------------

#: The experiment lock's file in ``<results_dir>/<experiment>``. Snakemake's own lock lies in its working folder
#: (``.snakemake/locks``), so two working folders whose configs name one results folder would not see
#: each other, and each deletes what it takes for its own incomplete outputs.
EXPERIMENT_LOCK = ".pathmamba-experiment.lock"


class ExperimentFolderBusy(Exception):
    """Another process (named in the message) holds the experiment lock of a results folder."""


def _holder_record(working_folder: Path) -> dict:
    return {"pid": os.getpid(), "host": platform.node(), "working_folder": str(working_folder),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read_holder(handle: int) -> dict | None:
    text = os.pread(handle, 1 << 16, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}
    return record if isinstance(record, dict) else {"unreadable": text[:200]}


def _describe(holder: dict) -> str:
    if "unreadable" in holder:
        return f"holder unreadable: {holder['unreadable']!r}"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, working folder {holder.get('working_folder')}, "
            f"since {holder.get('since')}")


def _pid_running(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _why_released(holder: dict) -> str:
    """Why a lock file that names ``holder`` is free: its holder ended without clearing it."""
    if "unreadable" in holder or holder.get("host") != platform.node():
        return "its lock is free, so that process has ended"
    if _pid_running(holder.get("pid")):
        return f"pid {holder.get('pid')} is now another process: the holder has ended"
    return f"pid {holder.get('pid')} is not running: it was killed or crashed"


def lock_experiment_folder(folder: Path, working_folder: Path) -> tuple[int | None, str | None]:
    """Lock the results folder ``folder`` (``<results_dir>/<experiment>``, created if absent) for this process,
    recording it, ``working_folder`` and the time in :data:`EXPERIMENT_LOCK`. Returns the open descriptor, which
    holds the lock until :func:`release_experiment_folder` or the process's end (SIGKILL too: the kernel
    releases it), and a note when a holder that ended without releasing it was taken over; (None, why)
    on a file system without locks. Raises :class:`ExperimentFolderBusy` naming the holder when another process
    holds it. Deletes nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EXPERIMENT_LOCK
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        os.close(handle)
        described = _describe(holder) if holder else "holder not written yet"
        raise ExperimentFolderBusy(
            f"{folder} is in use by another Snakemake run ({described}; lock {path}); two runs writing one "
            "results folder delete each other's files. Wait for it to end, stop it, or give this experiment another "
            "`experiment` name or `results_dir` in the config") from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        os.close(handle)
        return None, (f"{path}: this file system has no locks ({error.strerror}); nothing stops a second "
                      "Snakemake from another working folder writing into this results folder meanwhile")
    previous = _read_holder(handle)
    os.ftruncate(handle, 0)
    os.pwrite(handle, (json.dumps(_holder_record(Path(working_folder))) + "\n").encode(), 0)
    note = None
    if previous:
        note = (f"{path}: taken over from a run that ended without releasing it ({_describe(previous)}); "
                f"{_why_released(previous)}")
    return handle, note


def release_experiment_folder(handle: int) -> None:
    """Clear the holder and release a lock of :func:`lock_experiment_folder` (the file stays: removing a file
    that another process may be opening to lock would let two processes lock two different files)."""
    os.ftruncate(handle, 0)
    os.close(handle)
