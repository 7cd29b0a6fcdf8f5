"""Files written whole or not at all (a temporary sibling, then a rename), and the one file hash."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pathmamba.core.errors import NO_ROOM, disk_full

#: Bytes read at a time when hashing a file.
HASH_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_bytes(path: Path, data: bytes, sync: bool) -> None:
    """``data`` into the new file ``path``; with ``sync``, on disk before this returns."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        if error.errno in NO_ROOM:
            raise disk_full(path, None) from None
        raise
    os.close(handle)
    # mkstemp creates the file private (0600); results are shared on clusters, so give the renamed file
    # the permissions an ordinary write would have.
    give_ordinary_mode(Path(name))
    return Path(name)


def give_ordinary_mode(path: Path) -> None:
    """Set ``path``'s permissions to those an ordinary write or mkdir gives (0666, folders 0777, minus the
    umask): mkstemp, mkdtemp and safetensors create theirs private, and results are shared on clusters."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    tmp = temporary_sibling(path)
    try:
        _write_bytes(tmp, data, sync)
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in NO_ROOM:
            tmp.unlink(missing_ok=True)  # its room counts as free: the file needs it all
            raise disk_full(path, len(data)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def csv_text(rows: list[dict]) -> str:
    """``rows`` as CSV text: a header of every key, in the order keys first appear, then one line a row."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def normalised_path(path: Path) -> Path:
    """``path`` with ``..`` resolved as the file system resolves it (symbolic links first), so that a
    command checks and creates the folder the path names: ``new/..`` is the current folder, not a folder
    ``new`` to create with ``..`` inside. Paths without ``..`` are kept as given."""
    path = Path(path)
    return Path(os.path.realpath(path)) if ".." in path.parts else path


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) into ``path`` through a temporary file beside it: never a half-written file. A full
    disk is a :class:`DiskFull` naming the file and the bytes needed and free."""
    atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
