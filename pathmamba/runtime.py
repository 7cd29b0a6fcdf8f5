"""Run-time plumbing shared by training and evaluation: seeds, devices, atomic writes, run records."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathmamba import __version__, cpu_pins
from pathmamba.gpus import claimed_gpu, nvidia_driver
from pathmamba.settings import PRECISIONS

log = logging.getLogger("pathmamba.runtime")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed``.

    ``deterministic`` turns on ``torch.use_deterministic_algorithms`` and cuDNN's deterministic mode
    and switches cuDNN's autotuner off, for bitwise-identical GPU runs at some cost in speed. Without
    it the autotuner is on: it picks the fastest convolution kernels, which may differ run to run.
    """
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Switching the mode imports torch._inductor (1.6 s on 2 CPU cores, in every job): only on a change.
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, epoch, item), spread by SHA-256 so
    that neighbouring tuples give unrelated streams."""
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, CUDA) a resumed run needs to continue exactly.

    Tensors and plain Python values only, so a checkpoint holding it loads with ``weights_only=True``:
    numpy's state tuple carries an array, kept here as a list of ints.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [str(name), [int(key) for key in keys], int(position), int(has_gauss), float(cached_gaussian)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs back to a state saved by :func:`rng_state`."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot use a GPU here, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build (docs/environment.md)"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else ""
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU{where}: no NVIDIA GPU, "
            f"or a driver too old for CUDA {torch.version.cuda} (docs/environment.md: picking a CUDA build)")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of the ``device`` setting. ``auto`` is CUDA when available, else the CPU with a
    warning that says why; ``cuda`` without a usable GPU, or ``cuda:N`` beyond this machine's GPUs, is a
    :class:`DeviceUnavailable` naming the setting to change."""
    reason = cuda_unavailable_reason()
    if name == "auto":
        if reason is None:
            return torch.device("cuda")
        log.warning("device 'auto' runs on the CPU: %s", reason)
        return torch.device("cpu")
    if name.startswith("cuda") and reason is None and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        reason = f"this machine has {torch.cuda.device_count()} GPUs (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
    if name.startswith("cuda") and reason is not None:
        raise DeviceUnavailable(f"device {name!r} requested (train.device in the workflow config, `device` in "
                                f"--settings, or --device), but {reason}. To run on the CPU, set train.device to "
                                "'cpu' (the demo config does); `python -m pathmamba doctor` checks a machine "
                                "before a run")
    return torch.device(name)


class DeviceUnavailable(RuntimeError):
    """A device setting this machine cannot follow (``cuda`` without a usable GPU); the message names the
    setting. The CLI prints it without a traceback."""


def resolve_precision(name: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for the ``precision`` setting on ``device``. bf16 on a GPU without bf16
    support (before Ampere) is an error rather than a silent emulation."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is invalid; allowed: {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise RuntimeError(f"precision 'bf16' requested but {torch.cuda.get_device_name(device)} has no bf16 "
                           "support; set train.precision to 'fp32'")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved ``precision``: bf16 (no gradient scaler needed: bf16 has
    float32's exponent range) or off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


def _write_bytes(path: Path, data: bytes, sync: bool) -> None:
    """``data`` into the new file ``path``; with ``sync``, on disk before this returns."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        if error.errno in NO_ROOM:
            raise disk_full(path, None) from None
        raise
    os.close(handle)
    # mkstemp creates the file private (0600); results are shared on clusters, so give the renamed file
    # the permissions an ordinary write would have (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file. A full
    disk is a :class:`DiskFull` naming the file and the bytes needed and free."""
    # Serialised in memory first: torch's file writer ignores a failed write and then fails with an
    # "enforce fail ... unexpected pos" that names neither the file nor the cause.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    # On disk before the rename: a crash of the machine must not leave an empty checkpoint.
    _atomic_write_bytes(Path(path), buffer.getbuffer(), sync=True)


def _atomic_write_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    tmp = _temporary_sibling(path)
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


class InputError(ValueError):
    """A bad argument or input file the user can fix (seeds given twice, a run folder that does not exist,
    data of another dataset). The message is one line naming it; the CLI prints it without a traceback and
    exits with status 2."""


class FileSafetyError(RuntimeError):
    """A refusal that protects files: a folder or file this tool did not write, or a checkpoint folder
    another trainer holds. The message is one line for the user (the CLI prints it without a traceback)."""


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


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) into ``path`` through a temporary file beside it: never a half-written file. A full
    disk is a :class:`DiskFull` naming the file and the bytes needed and free."""
    _atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


#: Distributions whose versions are recorded with every result (those installed: a rule's conda
#: environment has no snakemake). pyproject.toml names this project's distribution pathmamba-benchmark.
RECORDED_PACKAGES = ("pathmamba-benchmark", "torch", "torchvision", "numpy", "pillow", "scikit-learn",
                     "segmentation-models-pytorch", "snakemake")


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment_record(device: torch.device, scan: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """What ran a result: package versions, device, CUDA build and driver, the selective scan and the
    precision that ran, the GPU slot (workstation runs), the CPU and its instruction-set pins
    (:func:`pathmamba.cpu_pins.record`), host and git commit.

    ``git_dirty`` is true when the checkout had uncommitted changes (the commit alone then does not
    say which code ran); both are None outside a git checkout.
    """
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    status = _git("status", "--porcelain", "--untracked-files=no")
    slot = claimed_gpu()
    on_gpu = device.type == "cuda"
    return {
        "pathmamba_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "packages": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else platform.processor(),
        "device_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if on_gpu else None,
        "cuda": torch.version.cuda,
        "cuda_driver": nvidia_driver() if on_gpu else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_slot": slot.record() if slot else None,
        "scan": scan,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "cpu": cpu_pins.record(),
        "host": platform.node(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


class ProgressLog:
    """Progress of a long loop as log lines: "<what> done/total (percent), rate/s, ETA", at most one line per
    ``every`` seconds and always one at the end. Log lines, not a terminal bar: the workflow keeps stderr in
    each job's log file, where a long job is otherwise silent."""

    def __init__(self, logger: logging.Logger, what: str, total: int, every: float = 30.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; log a line when ``every`` seconds have passed or all are done."""
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.logger.info("%s %d/%d (%.0f%%), %.1f/s, ETA %s", self.what, self.done, self.total,
                         100 * self.done / max(self.total, 1), rate, format_duration(eta))


def format_duration(seconds: float) -> str:
    """``seconds`` as H:MM:SS (``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def describe_environment(record: dict[str, Any]) -> str:
    """One line of :func:`environment_record`: the first line of every training or evaluation log."""
    device = f"{record['device']} ({record['device_name'] or 'unknown'}"
    device += f", {record['device_memory_gb']} GiB)" if record["device_memory_gb"] else ")"
    cuda = f"CUDA build {record['cuda']}" if record["cuda"] else "CPU-only build"
    if record["cuda_driver"]:
        cuda += f", driver {record['cuda_driver']}"
    slot = record["gpu_slot"]
    pool = f" | GPU slot {slot['gpu']} of pool {','.join(slot['pool'])}" if slot else ""
    return (f"device {device} | torch {record['torch']}, {cuda} | scan {record['scan']} | "
            f"precision {record['precision']} | threads {record['threads']}{pool} | {cpu_pins.describe(record['cpu'])}")


def download_file(url: str, path: Path, sha256_prefix: str | None = None) -> None:
    """Fetch ``url`` (http(s):// or file://) to ``path`` atomically.

    ``sha256_prefix``: the leading hex digits the file's SHA-256 must start with (torchvision puts
    them in its weight file names, e.g. ``resnet50-0676ba61.pth``); a mismatch is an error and
    leaves nothing at ``path``.
    """
    path = Path(path)
    tmp = _temporary_sibling(path)
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as handle:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    handle.write(chunk)
        except OSError as error:
            if error.errno in NO_ROOM:
                tmp.unlink(missing_ok=True)
                raise disk_full(path, None) from None
            if not isinstance(error, urllib.error.URLError):
                raise
            raise OSError(f"cannot download {url} to {path}: {error.reason}; without network, fetch the "
                          f"file elsewhere and give its file:// URL") from None
        if sha256_prefix and not digest.hexdigest().startswith(sha256_prefix):
            raise ValueError(f"{url}: SHA-256 {digest.hexdigest()} does not start with {sha256_prefix} "
                             "as expected; the download is corrupt or the URL serves another file")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
