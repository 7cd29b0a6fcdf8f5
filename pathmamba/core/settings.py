"""Training settings, importable without torch (the Snakefile's start-up and the GPU plan read them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

#: The annotation of each setting -> the types its value may have (bool is not a number here).
_ACCEPTED = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "int | None": (int, type(None))}


#: The ``scan`` setting: which selective scan runs on CUDA tensors (pathmamba/models/scan.py, docs/scan.md).
SCAN_IMPLEMENTATIONS = ("auto", "fused", "pytorch")
#: The ``precision`` setting: bf16 autocast (``auto`` on CUDA) or float32 throughout (``auto`` on the CPU);
#: resolved by pathmamba/core/devices.py.
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine")
SELECTIONS = ("best", "last")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based, of ``total_steps`` in the run) as a fraction
    of the configured one: 1 for ``constant``; for ``cosine`` half a cosine from 1 at the first step down
    to 0 after the last (SGDR without restarts, Loshchilov & Hutter 2017), so that the final weights have
    settled instead of being one noisy step of a constant-rate walk."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; defaults are the paper's (Adam, lr 1e-5, weight decay 5e-4, batch 16,
    100 epochs).

    ``workers``: data loader processes; None derives them from the CPU threads given to the job (see
    :func:`pathmamba.data.datasets.default_workers`). ``channels_last``: on CUDA, model and batches in the NHWC
    memory layout that tensor-core convolutions prefer; ignored on the CPU. ``deterministic``: deterministic
    algorithms and no cuDNN autotuning (bitwise-repeatable GPU runs, slower). ``device``: ``cuda``
    without a usable GPU is an error, ``auto`` falls back to the CPU with a warning. ``scan``: the
    selective scan (``auto``, ``fused`` mamba_ssm kernel, ``pytorch`` fallback; docs/scan.md).
    ``precision``: ``bf16`` autocast or ``fp32``; ``auto`` is bf16 on CUDA and fp32 on the CPU. The scan
    and precision that ran are recorded in ``run.json``. ``lr_schedule``: ``constant`` (the paper's fixed
    learning rate) or ``cosine`` (:func:`lr_factor`). ``selection``: the result is the weights of the
    ``best`` epoch by val mIoU, or of the ``last`` epoch.
    """

    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 5e-4
    augment: bool = True
    workers: int | None = None
    device: str = "auto"
    deterministic: bool = False
    channels_last: bool = True
    val_fraction: float = 0.2
    scan: str = "auto"
    precision: str = "auto"
    lr_schedule: str = "constant"
    selection: str = "best"

    def __post_init__(self) -> None:
        # A value of the wrong type (from --settings JSON) would otherwise fail deep inside training.
        for setting in fields(self):
            value = getattr(self, setting.name)
            accepted = _ACCEPTED[setting.type]
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                raise TypeError(f"{setting.name}={value!r} is not of type {setting.type}")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("selection", SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
