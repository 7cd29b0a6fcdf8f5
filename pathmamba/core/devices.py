"""The torch device and numeric precision of a job's settings, checked against this machine."""

from __future__ import annotations

import logging
import os

import torch

from pathmamba.core.errors import DeviceUnavailable
from pathmamba.core.settings import PRECISIONS

log = logging.getLogger("pathmamba.core.devices")


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
