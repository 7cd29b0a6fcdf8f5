"""Measured throughput of the configured methods: ``python -m pathmamba calibrate``.

The GPU plan and the SLURM time limits (pathmamba/operations/plan.py) need each method's images per second. This
times, on the device at hand and at the config's settings (hyper-parameters, batch size, image size),
what a method's jobs repeat: training steps (forward, loss, backward, Adam step; at the config's
``precision``, bf16 autocast on CUDA by default) through the training engine's own epoch loop, evaluation batches (``model.predict``) through
``predict_split``, and a first stage's pseudo-mask pass, each after warm-up steps. Inputs are random
images and random targets shaped like the method's supervision: the models' compute does not depend
on the pixel values, nor on the weights' values (``random_init``). Not timed: data loading and
decoding, per-epoch extras outside the steps (SC-CAM's re-clustering passes), checkpoint and mask
writes; the plan's per-job overhead stands for them.

The throughput file (JSON) records the device, the torch version, the date, the settings and, per
method, ``train_images_per_s``, ``eval_images_per_s``, ``peak_memory_mb``, ``steps``, ``batch_size``
and ``hparams``; a two-stage method has its first stage under ``stage1``, with
``pseudo_masks_images_per_s``.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import logging
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from pathmamba.core.devices import autocast, resolve_device, resolve_precision
from pathmamba.core.environment import environment_record
from pathmamba.core.errors import FileSafetyError
from pathmamba.core.files import atomic_write_json
from pathmamba.core.gpus import gpu_pool, threads_per_job
from pathmamba.core.seeds import seed_everything
from pathmamba.core.settings import TrainSettings
from pathmamba.data.datasets import normalised_batch
from pathmamba.data.specs import DatasetSpec
from pathmamba.engine.config import (
    WEIGHT_KEYS,
    ConfigError,
    check_methods,
    configured_dataset_spec,
    grid_methods,
    method_hparams,
    train_settings,
    without_weights_files,
)
from pathmamba.engine.evaluate import predict_split
from pathmamba.engine.optim import adam
from pathmamba.engine.registry import EpochAware, build_method, get_spec, training_stages, two_stage_methods
from pathmamba.engine.train import _train_epoch
from pathmamba.models.scan import select_scan
from pathmamba.operations.costs import random_targets
from pathmamba.operations.plan import (
    dataset_image_size,
    default_throughput_path,
    largest_image_dataset,
    load_workflow_config,
)

log = logging.getLogger("pathmamba.operations.calibrate")


class _PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`peak_mb`: on CUDA torch's maximum
    allocated bytes; on Linux CPUs the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs after glibc's malloc_trim hands freed heap back, so that memory an earlier
    method freed is not taken for this one's); None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kib: int | None = None

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field} line")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/clear_refs").exists():
            malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
            if malloc_trim is not None:
                malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base_kib = self._status_kib("VmRSS:")

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.base_kib is None:
            return None
        return (self._status_kib("VmHWM:") - self.base_kib) / 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(device: torch.device, run) -> float:
    """Wall seconds of ``run()``, with the device's queued work finished before each clock reading."""
    _synchronize(device)
    started = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - started


def _random_loaders(supervision: str, batches: int, batch_size: int, image_size: int,
                    pseudo_mask_kinds: int, num_classes: int) -> dict[str, DataLoader]:
    """``batches`` batches of random uint8 images, as the datasets give them, for training (with
    targets), evaluation (with masks and indices, as ``predict_split`` reads them) and pseudo masks (with
    multi-hot labels)."""
    n = batches * batch_size
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8)
    masks = torch.randint(0, num_classes + 1, (n, image_size, image_size))
    labels = torch.randint(0, 2, (n, num_classes)).float()
    targets = random_targets(supervision, n, image_size, pseudo_mask_kinds, num_classes)
    datasets = {"train": TensorDataset(images, targets),
                "eval": TensorDataset(images, masks, torch.arange(n)),
                "pseudo_masks": TensorDataset(images, labels)}
    return {name: DataLoader(dataset, batch_size=batch_size) for name, dataset in datasets.items()}


def _pseudo_mask_pass(model, loader: DataLoader, device: torch.device, dataset: DatasetSpec,
                      precision: str) -> None:
    """What ``pathmamba.engine.pseudo_masks.write_pseudo_masks`` computes per batch, without the PNG writes."""
    for images, labels in loader:
        with autocast(device, precision):
            masks = model.pseudo_masks(normalised_batch(images, device), labels.to(device), dataset)
        for kind_masks in masks:
            kind_masks.cpu()


def measure(method: str, hparams: dict[str, Any], settings: TrainSettings, image_size: int,
            device: torch.device, dataset: DatasetSpec, steps: int, warmup_steps: int, stage: int | None = None,
            stage1_hparams: dict[str, Any] | None = None, pseudo_mask_kinds: int = 0) -> dict[str, Any]:
    """Images per second of ``method`` (``stage=1``: its first stage) built with ``hparams``: training
    and evaluation, and for a first stage its pseudo masks; peak memory; ``steps`` timed batches each.

    A method trained on pseudo masks is built on its first stage's keywords ``stage1_hparams`` and
    trained on ``pseudo_mask_kinds`` masks per image. ``dataset``: the dataset's spec, for its number of
    classes and the models' per-dataset choices (WSSS-Tissue's white background).
    """
    supervision = get_spec(method, stage).supervision
    # The scan, precision and memory layout that training with these settings runs (pathmamba.engine.train.train).
    scan = select_scan(settings.scan, device)
    precision = resolve_precision(settings.precision, device)
    channels_last = settings.channels_last and device.type == "cuda"
    memory = _PeakMemory(device)
    memory.start()
    seed_everything(0, settings.deterministic)
    build_hparams = {**hparams, "stage1_hparams": stage1_hparams} if stage1_hparams is not None else hparams
    model = build_method(method, num_classes=dataset.num_classes, stage=stage, **build_hparams).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = adam(model, settings.lr, settings.weight_decay)
    warmup = _random_loaders(supervision, warmup_steps, settings.batch_size, image_size, pseudo_mask_kinds,
                             dataset.num_classes)
    timed = _random_loaders(supervision, steps, settings.batch_size, image_size, pseudo_mask_kinds,
                            dataset.num_classes)
    if isinstance(model, EpochAware):
        # The per-epoch state of the last epoch (SC-CAM's clusters, WSSS-Tissue's dropout threshold), so
        # that the steps cost what most of a run's steps cost.
        for epoch in range(1, settings.epochs + 1):
            model.on_epoch_start(epoch, timed["train"], device, dataset.name)

    def train_epoch(loader: DataLoader) -> None:
        _train_epoch(model, optimiser, loader, device, settings.epochs, settings.epochs, channels_last,
                     precision)

    def evaluate(loader: DataLoader) -> None:
        predict_split(model, loader, device, dataset.num_classes, channels_last=channels_last, precision=precision)

    if warmup_steps:
        train_epoch(warmup["train"])
        evaluate(warmup["eval"])
    images = steps * settings.batch_size
    entry = {"train_images_per_s": images / _seconds(device, lambda: train_epoch(timed["train"])),
             "eval_images_per_s": images / _seconds(device, lambda: evaluate(timed["eval"]))}
    if stage == 1:
        model.eval()
        if warmup_steps:
            _pseudo_mask_pass(model, warmup["pseudo_masks"], device, dataset, precision)
        entry["pseudo_masks_images_per_s"] = images / _seconds(
            device, lambda: _pseudo_mask_pass(model, timed["pseudo_masks"], device, dataset, precision))
        entry["pseudo_mask_kinds"] = len(model.pseudo_mask_names)
    entry = {**entry, "peak_memory_mb": memory.peak_mb(), "steps": steps, "batch_size": settings.batch_size,
             "scan": scan, "precision": precision, "hparams": hparams}
    log.info("%s%s: %s", method, " (stage 1)" if stage == 1 else "",
             ", ".join(f"{key} {value:.4g}" for key, value in entry.items()
                       if key.endswith(("_per_s", "_mb")) and value is not None))
    return entry


def calibration_hparams(config: dict[str, Any], method: str, stage: int | None,
                        random_init: bool) -> dict[str, Any]:
    """The builder keywords of ``method`` (``stage=1``: its first stage) from ``config``; with
    ``random_init`` every weights file set to ``none``, else each named file checked to exist."""
    hparams = method_hparams(config, method, stage)
    if random_init:
        return without_weights_files(hparams)
    block = f"methods.{method}.stage1.hparams" if stage == 1 else f"methods.{method}.hparams"
    for key in WEIGHT_KEYS:
        value = hparams.get(key, "none")
        if value not in ("none", "imagenet") and not Path(value).is_file():
            raise ConfigError(f"{block}.{key}: weights file {value!r} does not exist; fetch it (the "
                              "fetch_weights rule) or calibrate with --random-init (speed does not depend "
                              "on the weights' values)")
    return hparams


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def calibrate(config: dict[str, Any], device: str | None = None, steps: int = 5, warmup_steps: int = 2,
              methods: list[str] | None = None, random_init: bool = False, threads: int | None = None,
              scan: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """The throughput record of ``methods`` (default: every configured one) of ``config`` on ``device``
    (default: the config's ``train.device``), ``steps`` timed batches each after ``warmup_steps``, with
    ``threads`` torch threads (default: the config's ``threads_per_job``, what its jobs get; ``auto``
    resolved for this machine's cores and GPUs, :func:`pathmamba.core.gpus.threads_per_job`).
    ``scan`` and ``precision`` replace the config's training settings of that name (a config that
    trains with the fused CUDA scan calibrated on a CPU, say).

    The image size is the configured datasets' (the largest, if they differ).
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"calibrate: steps must be >= 1 and warmup_steps >= 0, got {steps} and "
                         f"{warmup_steps}")
    methods = grid_methods(config) if methods is None else methods
    unknown = [method for method in methods if method not in config["methods"]]
    if unknown:
        raise ConfigError(f"methods: {', '.join(unknown)} not configured; configured methods: "
                          f"{', '.join(config['methods'])}")
    check_methods(config, methods)  # before any model is built: a typo is not a traceback
    dataset = largest_image_dataset(config)
    image_size = dataset_image_size(config, dataset)
    configured = config.get("threads_per_job", torch.get_num_threads())
    torch.set_num_threads(threads or threads_per_job(configured, os.cpu_count() or 1,
                                                     len(gpu_pool(config.get("gpus", "auto")))))
    torch_device = resolve_device(device or config["train"].get("device", TrainSettings.device))
    # Every weights file, scan and precision checked before the first (slow) measurement.
    stages = {method: training_stages(method) for method in methods}
    hparams = {(method, stage): calibration_hparams(config, method, stage, random_init)
               for method in methods for stage in stages[method]}
    overrides = {key: value for key, value in (("scan", scan), ("precision", precision)) if value is not None}
    settings = {key: TrainSettings(**{**train_settings(config, *key), **overrides}) for key in hparams}
    for (method, _), method_settings in settings.items():
        try:
            select_scan(method_settings.scan, torch_device)
            resolve_precision(method_settings.precision, torch_device)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(f"methods.{method}: {error}; or calibrate with --scan / --precision") from None
    # The builders' modules imported before any measurement: their import (hundreds of MB of resident
    # libraries) would otherwise count as the peak memory of the first method built from each.
    for method, stage in hparams:
        importlib.import_module(get_spec(method, stage).target.partition(":")[0])
    common = {"image_size": image_size, "device": torch_device, "dataset": configured_dataset_spec(config, dataset),
              "steps": steps,
              "warmup_steps": warmup_steps}
    measured: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method in two_stage_methods():
            first = measure(method, hparams[method, 1], settings[method, 1], stage=1, **common)
            second = measure(method, hparams[method, None], settings[method, None],
                             stage1_hparams=hparams[method, 1], pseudo_mask_kinds=first["pseudo_mask_kinds"],
                             **common)
            measured[method] = {**second, "stage1": first}
        else:
            measured[method] = measure(method, hparams[method, None], settings[method, None], **common)
    return {
        "device_type": torch_device.type,
        "device_name": (torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda"
                        else cpu_name()),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {"image_size": image_size, "steps": steps, "warmup_steps": warmup_steps,
                     "threads": torch.get_num_threads(), "random_init": random_init},
        "methods": measured,
        "environment": environment_record(torch_device),
    }


#: Keys of every throughput record that :func:`calibrate` writes: what tells its files from others.
RECORD_KEYS = ("device_type", "device_name", "torch", "settings", "methods")


def not_a_throughput_file(path: Path) -> str | None:
    """Why the existing ``path`` is not a throughput file written by ``calibrate`` (None: it is one)."""
    if path.is_symlink() or not path.is_file():
        return "a symbolic link" if path.is_symlink() else "not a regular file"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return "not a JSON file"
    lacking = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    return f"a JSON file without {', '.join(lacking)}" if lacking else None


def check_throughput_out(out: Path) -> None:
    """Raise :class:`FileSafetyError` if ``out`` exists and is not a throughput file of ``calibrate``: the
    rule of ``predict`` and ``export``, never replacing what this tool did not write."""
    if (out.exists() or out.is_symlink()) and (reason := not_a_throughput_file(out)):
        raise FileSafetyError(f"{out} exists and is not a throughput file written by calibrate ({reason}); not "
                              "replacing it: give another --out, or remove it yourself")


def write_calibration(configfile: Path, out: Path | None = None,
                      **options: Any) -> tuple[Path, dict[str, Any]]:
    """Calibrate the workflow config ``configfile`` (``options``: those of :func:`calibrate`) and write
    the throughput file atomically to ``out``, default the one the plan reads for a config training on
    this device type (:func:`pathmamba.operations.plan.default_throughput_path`); returns (file, record). An existing
    file there is replaced only if it is an earlier throughput file (:func:`check_throughput_out`), checked
    before measuring when ``out`` is given, and again before writing."""
    config = load_workflow_config(configfile)
    if out is not None:
        check_throughput_out(Path(out))
    record = calibrate(config, **options)
    record["config"] = str(configfile)
    out = Path(out) if out is not None else default_throughput_path(config, record["device_type"])
    check_throughput_out(out)
    atomic_write_json(out, record)
    return out, record


def format_calibration(record: dict[str, Any]) -> str:
    """A Markdown table of a throughput record: images per second and peak memory per method."""
    settings = record["settings"]
    heading = (f"{record['device_type']} ({record['device_name']}, {settings['threads']} threads), torch "
               f"{record['torch']}, {settings['image_size']} px, {settings['steps']} timed "
               f"steps after {settings['warmup_steps']}")
    lines = [heading, "",
             "| method | batch | train images/s | eval images/s | pseudo-mask images/s | peak MB |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = []
    for method, entry in record["methods"].items():
        if "stage1" in entry:
            rows.append((f"{method} (stage 1)", entry["stage1"]))
        rows.append((method, entry))
    for name, entry in rows:
        pseudo = entry.get("pseudo_masks_images_per_s")
        peak = entry["peak_memory_mb"]
        lines.append(f"| {name} | {entry['batch_size']} | {entry['train_images_per_s']:.4g} | "
                     f"{entry['eval_images_per_s']:.4g} | {'' if pseudo is None else f'{pseudo:.4g}'} | "
                     f"{'' if peak is None else f'{peak:.0f}'} |")
    return "\n".join(lines)
