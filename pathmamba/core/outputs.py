"""A command's output folder (``predict``, ``export``, ``pseudo-masks``): built beside its destination,
renamed into place.

The folder is written into a fresh hidden sibling and renamed to ``--out`` when complete, so an
interrupted command leaves no half-written folder. An existing ``--out`` is replaced only when it is
empty or this tool wrote it, as the command's ownership test says (``not_ours(folder)``: why it is not
ours, None when it is; :func:`listed_in` for folders whose record file lists every file). Anything else is
refused, never deleted or written into.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pathmamba.core.errors import FileSafetyError
from pathmamba.core.files import give_ordinary_mode

#: Why an existing folder is not an output of this tool (None: it is, or it is empty).
Ownership = Callable[[Path], "str | None"]


def not_listed(folder: Path, record: str) -> str | None:
    """Why the existing ``folder`` is not an output folder of this tool with the record file ``record``,
    a JSON object whose ``files`` lists every other file in it (None: it is, or it is empty)."""
    if folder.is_symlink() or not folder.is_dir():
        return "a symbolic link" if folder.is_symlink() else "not a folder"
    found = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}
    if not found:
        return None
    try:
        listed = {str(name) for name in json.loads((folder / record).read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return f"no {record} of this tool in it"
    if extra := sorted(found - listed - {record}):
        return f"it holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} besides what {record} lists"
    if any(path.is_symlink() for path in folder.rglob("*")):
        return "it holds symbolic links"
    return None


def listed_in(record: str) -> Ownership:
    """The ownership test of folders whose record file ``record`` lists every file (:func:`not_listed`)."""
    return partial(not_listed, record=record)


def check_replaceable(out_dir: Path, not_ours: Ownership, what: str) -> None:
    """Raise :class:`FileSafetyError` if ``out_dir`` exists and is not ours (``what``: e.g. "a prediction
    folder") to replace."""
    if (out_dir.exists() or out_dir.is_symlink()) and (reason := not_ours(out_dir)):
        raise FileSafetyError(f"{out_dir} exists and is not {what} written by this tool ({reason}); not "
                              "writing into it: give another --out, or remove it yourself")


def new_sibling(out_dir: Path, role: str) -> Path:
    """A new, empty hidden folder beside ``out_dir`` (same file system: the rename is atomic), with the
    permissions an ordinary mkdir gives (mkdtemp makes it private)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{role}-", dir=out_dir.parent))
    give_ordinary_mode(folder)
    return folder


def put_in_place(building: Path, out_dir: Path, not_ours: Ownership, what: str) -> None:
    """Rename the finished ``building`` to ``out_dir``. Our earlier output there is moved aside first and
    deleted only once the new folder is in place (put back if the rename fails)."""
    check_replaceable(out_dir, not_ours, what)  # again: something may have appeared there meanwhile
    if not (out_dir.exists() or out_dir.is_symlink()) or not any(out_dir.iterdir()):
        building.rename(out_dir)  # onto nothing, or onto an empty folder
        return
    aside = new_sibling(out_dir, "replaced")
    out_dir.rename(aside / out_dir.name)
    try:
        building.rename(out_dir)
    except BaseException:
        (aside / out_dir.name).rename(out_dir)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
