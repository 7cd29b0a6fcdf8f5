"""The record of what ran a result (packages, device, CUDA, scan, precision, CPU pins, git commit)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import numpy as np
import torch

from pathmamba import __version__
from pathmamba.core import cpu_pins
from pathmamba.core.gpus import claimed_gpu, nvidia_driver
from pathmamba.core.layout import REPO

#: Distributions whose versions are recorded with every result (those installed: a rule's conda
#: environment has no snakemake). pyproject.toml names this project's distribution pathmamba-benchmark.
RECORDED_PACKAGES = ("pathmamba-benchmark", "torch", "torchvision", "numpy", "pillow", "scikit-learn",
                     "segmentation-models-pytorch", "snakemake")


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                                cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment_record(device: torch.device, scan: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """What ran a result: package versions, device, CUDA build and driver, the selective scan and the
    precision that ran, the GPU slot (workstation runs), the CPU and its instruction-set pins
    (:func:`pathmamba.core.cpu_pins.record`), host and git commit.

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
