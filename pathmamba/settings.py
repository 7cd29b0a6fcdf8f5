"""Training settings, importable without torch (the Snakefile's start-up and the GPU plan read them)."""

from __future__ import annotations

from dataclasses import dataclass, fields

#: The annotation of each setting -> the types its value may have (bool is not a number here).
_ACCEPTED = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "int | None": (int, type(None))}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; defaults are the paper's (Adam, lr 1e-5, weight decay 5e-4, batch 16,
    100 epochs).

    ``workers``: data loader processes; None derives them from the CPU threads given to the job (see
    :func:`pathmamba.train.default_workers`). ``channels_last``: on CUDA, model and batches in the NHWC
    memory layout that tensor-core convolutions prefer; ignored on the CPU. ``deterministic``: deterministic
    algorithms and no cuDNN autotuning (bitwise-repeatable GPU runs, slower). ``device``: ``cuda``
    without a usable GPU is an error, ``auto`` falls back to the CPU with a warning. ``scan``: the
    selective scan (``auto``, ``fused`` mamba_ssm kernel, ``pytorch`` fallback; docs/scan.md).
    ``precision``: ``bf16`` autocast or ``fp32``; ``auto`` is bf16 on CUDA and fp32 on the CPU. The scan
    and precision that ran are recorded in ``run.json``.
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

    def __post_init__(self) -> None:
        # A value of the wrong type (from --settings JSON) would otherwise fail deep inside training.
        for setting in fields(self):
            value = getattr(self, setting.name)
            accepted = _ACCEPTED[setting.type]
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                raise TypeError(f"{setting.name}={value!r} is not of type {setting.type}")
