"""GPUs of a workstation as a pool of slots: one GPU per running job.

Snakemake counts GPU jobs against a ``gpu`` resource (as many units as the pool has GPUs), so no more
jobs than GPUs run at once; it does not say which GPU a job should use. Each GPU job therefore claims a
slot itself before CUDA starts: an exclusive ``flock`` on ``<lock_dir>/gpu<id>.lock``, held until the
process ends, then ``CUDA_VISIBLE_DEVICES=<id>``. The kernel drops a dead process's lock, so a crashed
or killed job never leaves a slot taken. The lock folder is per host and user, not per run, so two
Snakemake runs on one workstation do not share a GPU either.

The workflow passes the pool to its jobs in ``PATHMAMBA_GPU_POOL`` (GPU ids, comma-separated) and
``PATHMAMBA_GPU_LOCK_DIR``. Under SLURM (``SLURM_JOB_ID`` set) the scheduler has already given the
job its GPU and the pool is not used. Nothing here imports torch: the slot must be chosen before
CUDA is initialised, and the Snakefile's start-up stays fast.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pathmamba.core.locks import try_lock

log = logging.getLogger("pathmamba.core.gpus")

POOL_VARIABLE = "PATHMAMBA_GPU_POOL"
LOCK_DIR_VARIABLE = "PATHMAMBA_GPU_LOCK_DIR"
#: Seconds between attempts while every slot is taken (only when a job was started beside the pool's
#: count, e.g. by a second Snakemake run on the same GPUs).
RETRY_SECONDS = 2.0


def visible_gpus() -> list[str]:
    """Ids of the NVIDIA GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (empty or -1:
    none), else every GPU ``nvidia-smi`` lists; none when it is not installed."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        # CUDA ignores the ids from the first invalid one on; -1 is the usual way to hide every GPU.
        return [] if not ids or ids[0] == "-1" else ids
    return nvidia_smi("index")


def nvidia_smi(field: str) -> list[str]:
    """One line per GPU of ``nvidia-smi --query-gpu=<field>``; empty without a working nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def gpu_pool(configured: int | str = "auto") -> list[str]:
    """The GPU ids that jobs are spread over: the visible ones (``auto``), or the first ``n`` of them.

    An ``n`` larger than the visible count gives ids ``0..n-1``: the pool then describes GPUs that
    this host cannot see (a pretend pool, as the tests use on a CPU machine); jobs that need a real
    GPU fail at their start with the device error.
    """
    visible = visible_gpus()
    if configured == "auto":
        return visible
    count = int(configured)
    if count < 0:
        raise ValueError(f"gpus: {configured!r} is invalid; expected 'auto' or a number of GPUs >= 0")
    return visible[:count] if len(visible) >= count else [str(index) for index in range(count)]


def threads_per_job(configured: int | str, cores: int, gpus: int) -> int:
    """CPU threads of each job: ``configured`` when it is a number. ``auto``: the ``cores`` less one (kept
    for Snakemake and the system), split evenly between the ``gpus``, so that every GPU runs a job at
    once: ``(cores - 1) // gpus``, at least 1. Without GPUs, ``cores - 1``: jobs then run one at a time."""
    if configured != "auto":
        return int(configured)
    return max(1, (cores - 1) // max(gpus, 1))


def default_lock_dir() -> Path:
    """The host's slot locks of this user: in the temporary folder, which is local to the machine."""
    return Path(tempfile.gettempdir()) / f"pathmamba-gpu-slots-{os.getuid()}"


@dataclass(frozen=True)
class GpuSlot:
    """A claimed GPU: its id in the pool, the pool, the lock file and when it was claimed (epoch s)."""

    gpu: str
    pool: tuple[str, ...]
    lock_file: str
    claimed_at: float

    def record(self) -> dict:
        return {"gpu": self.gpu, "pool": list(self.pool), "lock_file": self.lock_file, "claimed_at": self.claimed_at}


# The slot this process holds and its open lock file: closing the file would release the slot.
_claimed: dict = {}


def claim_gpu(pool: list[str], lock_dir: Path, retry_seconds: float = RETRY_SECONDS) -> GpuSlot:
    """Lock a free GPU of ``pool`` for the rest of this process and make it the only visible one.

    Waits while every slot is taken, saying so once. Returns the claimed slot.
    """
    if not pool:
        raise ValueError("claim_gpu: the GPU pool is empty")
    if _claimed:
        raise RuntimeError(f"this process already holds GPU {_claimed['slot'].gpu}")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        for gpu in pool:
            path = lock_dir / f"gpu{gpu}.lock"
            handle = try_lock(path)  # the file names the holder, for whoever wonders which job has this GPU
            if handle is None:
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            if waiting_since is not None:
                log.info("GPU %s free after %.0f s", gpu, time.time() - waiting_since)
            _claimed.update(slot=GpuSlot(gpu, tuple(pool), str(path), time.time()), handle=handle)
            return _claimed["slot"]
        if waiting_since is None:
            waiting_since = time.time()
            log.info("every GPU of the pool %s is taken (locks in %s); waiting for one", ",".join(pool), lock_dir)
        time.sleep(retry_seconds)


def claim_workflow_gpu() -> GpuSlot | None:
    """Claim a slot of the pool the workflow passed in the environment; None outside a pooled run
    (no pool given, or under SLURM, which assigns the GPU itself)."""
    pool = [gpu for gpu in os.environ.get(POOL_VARIABLE, "").split(",") if gpu]
    if not pool or "SLURM_JOB_ID" in os.environ:
        return None
    return claim_gpu(pool, Path(os.environ.get(LOCK_DIR_VARIABLE) or default_lock_dir()))


def claimed_gpu() -> GpuSlot | None:
    """The slot this process claimed, if any."""
    return _claimed.get("slot")


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it; None without one."""
    versions = nvidia_smi("driver_version")
    return versions[0] if versions else None
