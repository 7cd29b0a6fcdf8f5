"""Files of tensors and plain data: written atomically, loaded with ``weights_only=True`` only."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathmamba.core.errors import FileSafetyError
from pathmamba.core.files import atomic_write_bytes


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file. A full
    disk is a :class:`DiskFull` naming the file and the bytes needed and free."""
    # Serialised in memory first: torch's file writer ignores a failed write and then fails with an
    # "enforce fail ... unexpected pos" that names neither the file nor the cause.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    # On disk before the rename: a crash of the machine must not leave an empty checkpoint.
    atomic_write_bytes(Path(path), buffer.getbuffer(), sync=True)


def plain_data(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, and paths turned into plain Python values (numbers, lists,
    str), recursively through dicts, lists and tuples; tensors are kept. What a file meant to load with
    ``torch.load(weights_only=True)`` may hold besides tensors."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    raise TypeError(f"cannot store {type(value).__name__} in a tensors-and-plain-data file: {value!r}")


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` of a file this tool wrote (``what``: e.g. "model file"), with ``weights_only=True``:
    tensors and plain data, never arbitrary pickled objects. A file that is not one (another tool's, an
    older version's, a damaged one) is a :class:`FileSafetyError` naming it; there is no pickle fallback."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # noqa: BLE001 - unpickling refusals and damaged archives raise many types
        raise FileSafetyError(f"{path}: not a {what} of this tool, or damaged: it does not load as tensors and "
                              f"plain data ({_load_failure(error)}); not unpickled") from None


def _load_failure(error: Exception) -> str:
    """The gist of a ``torch.load`` error in a few words (torch's own message spans lines and suggests
    ``weights_only=False``, which is exactly what must not be done with a file of unknown origin)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return line.split(" was not an allowed global")[0][:160]
