"""The training engine shared by every registered method.

One run = one (method, dataset, seed). Adam with a fixed learning rate (the paper's protocol), the
model of the epoch with the best validation mIoU kept.

Reproducibility and preemption: the data order and each image's augmentation are functions of
(seed, epoch, image) only, so they are the same with any number of loader workers and after a resume;
the other random state (model initialisation, dropout) is restored from the checkpoint. After every
epoch a checkpoint is written atomically into ``checkpoint_dir`` (outside the workflow's declared
outputs, which Snakemake deletes after a failure): ``last.pt`` (model, optimiser, epoch, best score,
history, RNG states), ``previous.pt`` (the one before, the fallback if ``last.pt`` is unreadable) and
``best-epochNNNN.pt`` (the best weights). A rerun resumes after the last complete epoch; a job killed
in the middle of an epoch repeats that epoch and ends with the same result as an uninterrupted run.
Once the outputs are written the checkpoints are deleted: they are several times the model's size, and a
run forced to rerun (after a code change, say) must train again, not return the finished run's model.
Checkpoints of another run (another fingerprint: method, data, seed, hparams, settings, optimiser groups)
are moved aside into ``superseded-<id>/``, unreadable ones into ``unusable-<time>/``; never deleted. A
trainer holds an exclusive lock on ``checkpoint_dir/train.lock`` for the whole run: a second trainer on
the same folder fails at once, naming the holder.
SIGTERM (sent by SLURM before its kill) stops training after the current step (or the current
epoch's checkpoint write), keeping the last complete epoch's checkpoint, and raises
:class:`TrainingInterrupted` (the CLI exits with 128 + the signal number).
A diverged run is never a result: a nan or infinite loss or gradient stops training before that step's
update with :class:`TrainingDiverged`, naming the epoch and step; no ``model.pt`` is written (the CLI
exits with 2), so no evaluation and no table ever sees the run's numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from pathmamba import __version__
from pathmamba.core.devices import autocast, resolve_device, resolve_precision
from pathmamba.core.environment import describe_environment, environment_record
from pathmamba.core.errors import FileSafetyError, TrainingDiverged
from pathmamba.core.files import atomic_write_json, atomic_write_text, csv_text, file_sha256
from pathmamba.core.layout import HISTORY, MODEL, RUN_RECORD
from pathmamba.core.locks import lock_holder, try_lock
from pathmamba.core.progress import format_duration
from pathmamba.core.seeds import derived_seed, restore_rng_state, rng_state, seed_everything
from pathmamba.core.settings import TrainSettings, lr_factor
from pathmamba.core.torch_files import atomic_torch_save, load_torch_file, plain_data
from pathmamba.data.datasets import (
    ImageLabelDataset,
    ImageMaskDataset,
    PseudoMaskDataset,
    default_workers,
    normalised_batch,
)
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import DatasetSpec, get_dataset_spec
from pathmamba.engine.evaluate import predict_split
from pathmamba.engine.optim import adam
from pathmamba.engine.registry import EpochAware, build_method, get_spec, selectable_epoch
from pathmamba.models.scan import select_scan

log = logging.getLogger("pathmamba.engine.train")

#: Pixel-supervised methods train on val masks; this fixed split (independent of the run's seed) keeps
#: a fifth of val aside for model selection, the same images for every seed.
PIXEL_SPLIT_SEED = 0

#: The least time between two progress lines of a training epoch in the log.
PROGRESS_SECONDS = 10.0

#: Settings that change speed but not results; a checkpoint written under other values still resumes.
NOT_FINGERPRINTED = ("workers",)


class TrainingInterrupted(RuntimeError):
    """Training stopped by a signal; the checkpoint of the last complete epoch is kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def split_for_pixel_supervision(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """A fixed seeded split of ``n`` val images into (train, select) index lists."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(PIXEL_SPLIT_SEED)).tolist()
    n_select = max(1, round(n * val_fraction))
    return sorted(order[n_select:]), sorted(order[:n_select])


class EpochSeeded(Dataset):
    """Wraps a training dataset so that the random augmentation of item ``i`` in epoch ``e`` depends
    only on (seed, e, i): the same in the main process or any loader worker, and after a resume.

    The wrapped dataset draws from torch's global CPU generator; it is reseeded per item inside
    ``fork_rng``, so the main process's own random stream is left as it was. The epoch lives in shared
    memory, so that loader workers kept from one epoch to the next (persistent) read the current one.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Before the epoch's loader iterator is made: workers read it when the iterator sends them indices."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def unaugmented(self) -> Dataset:
        """The wrapped dataset without augmentation: nothing random is left to seed."""
        return self.dataset.unaugmented()

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derived_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def _worker_init(worker_id: int) -> None:
    # The main process handles SIGTERM; a worker raising on it would hide that behind a loader error.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _loaders(index, spec, supervision: str, settings: TrainSettings, seed: int, workers: int,
             pin: bool, pseudo_masks: Path | None) -> tuple[DataLoader, DataLoader, EpochSeeded, torch.Generator]:
    """(train loader, model-selection loader, the epoch-seeded train set, the data-order generator).

    Workers are persistent: started once, not every epoch (``set_epoch`` reaches them through shared
    memory). Batches hold uint8 images, normalised on the device (:func:`normalised_batch`).
    """
    val = ImageMaskDataset(index.val, spec)
    if supervision == "image":
        train_set = ImageLabelDataset(index.train, augment=settings.augment)
        select_set = val
    elif supervision == "pseudo":
        train_set = PseudoMaskDataset(index.train, pseudo_masks, spec, augment=settings.augment)
        select_set = val
    else:
        fit, select = split_for_pixel_supervision(len(index.val), settings.val_fraction)
        train_set = Subset(ImageMaskDataset(index.val, spec, augment=settings.augment), fit)
        select_set = Subset(val, select)
    seeded = EpochSeeded(train_set, seed)
    order = torch.Generator()
    # The loader draws its workers' base seed from its own generator, not from the global one.
    common = {"num_workers": workers, "pin_memory": pin, "worker_init_fn": _worker_init if workers else None,
              "persistent_workers": workers > 0}
    train_loader = DataLoader(seeded, batch_size=settings.batch_size, sampler=RandomSampler(seeded, generator=order),
                              drop_last=False, generator=torch.Generator().manual_seed(seed), **common)
    select_loader = DataLoader(select_set, batch_size=settings.batch_size, shuffle=False, **common)
    return train_loader, select_loader, seeded, order


def _best_path(checkpoint_dir: Path, epoch: int) -> Path:
    return checkpoint_dir / f"best-epoch{epoch:04d}.pt"


def fingerprint_id(fingerprint: dict) -> str:
    """A short hash of a run's fingerprint: names the folder its checkpoints are moved to when superseded."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_checkpoint(path: Path, fingerprint: dict) -> tuple[dict | None, dict | None]:
    """(the resumable state in ``path``, None) if it and its best weights are readable and belong to this
    exact run; (None, its state) if it is readable but of other settings; (None, None) if it is absent or
    unusable. A warning says why it is not resumed."""
    if not path.exists():
        return None, None
    try:
        state = load_torch_file(path, "training checkpoint")
        if state.get("fingerprint") != plain_data(fingerprint):  # as saved (numpy numbers as Python ones)
            log.warning("checkpoint %s belongs to other settings; not resuming from it", path)
            return None, state
        if state["best"]["epoch"]:
            load_torch_file(_best_path(path.parent, state["best"]["epoch"]), "best-weights file")
    except Exception as error:  # noqa: BLE001 - whatever a damaged file raises, fall back: never a crash loop
        log.warning("checkpoint %s is unusable (%s: %s)", path, type(error).__name__, error)
        return None, None
    return state, None


def _move_aside(checkpoint_dir: Path, paths: list[Path], state: dict | None) -> Path | None:
    """Move the existing ``paths`` (checkpoint files this run cannot resume from) into a new sub-folder
    of ``checkpoint_dir``: ``superseded-<fingerprint id>`` when ``state`` (the checkpoint's content) says
    whose they are, else ``unusable-<time>``. Never deleted: they may be another seed's run or a shorter
    run of these settings, resumable by moving them back. Returns the folder (None: nothing to move)."""
    paths = [path for path in paths if path.exists()]
    if not paths:
        return None
    fingerprint = state.get("fingerprint") if isinstance(state, dict) else None
    stem = f"superseded-{fingerprint_id(fingerprint)}" if fingerprint else f"unusable-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        folder = checkpoint_dir / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise FileSafetyError(f"{checkpoint_dir}: too many {stem}* folders; remove those not needed")
    for path in paths:
        os.replace(path, folder / path.name)
    log.warning("moved %s to %s (kept, not deleted; delete that folder once it is not needed)",
                ", ".join(path.name for path in paths), folder)
    return folder


def _resume_state(checkpoint_dir: Path, fingerprint: dict) -> tuple[dict | None, Path | None]:
    """The newest usable checkpoint state and its file: ``last.pt``, else ``previous.pt``, else
    (None, None). Files that cannot be resumed (damaged, another version's, or of other settings: another
    seed, fewer epochs) are moved aside by :func:`_move_aside`, so that the next save does not rotate one
    into the fallback, nor delete their best weights; never deleted."""
    last, previous = checkpoint_dir / "last.pt", checkpoint_dir / "previous.pt"
    state, other = _read_checkpoint(last, fingerprint)
    if state is not None:
        return state, last
    fallback, other_previous = _read_checkpoint(previous, fingerprint)
    if fallback is not None:
        _move_aside(checkpoint_dir, [last], other)
        return fallback, previous
    if last.exists() or previous.exists():
        log.warning("no usable checkpoint in %s; training from scratch", checkpoint_dir)
        # The best weights go with the checkpoints that refer to them.
        _move_aside(checkpoint_dir, [last, previous, *sorted(checkpoint_dir.glob("best-epoch*.pt"))],
                    other or other_previous)
    return None, None


#: The lock file a trainer holds in its checkpoint folder while it runs.
LOCK_FILE = "train.lock"


@contextmanager
def checkpoint_lock(checkpoint_dir: Path):
    """Hold an exclusive ``flock`` on ``checkpoint_dir/train.lock`` (the holder's PID written into it):
    a second trainer on the same folder (a rerun while a killed Snakemake's job lives on) fails at once
    with a :class:`FileSafetyError` naming the lock and its holder. The kernel releases the lock when the
    process ends, SIGKILL included. On release the lock file is removed (a new trainer checks that the
    file it locked is still the one at the path), and the folder too if nothing else is left in it."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / LOCK_FILE
    while True:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        try:
            handle = try_lock(path)
        except FileNotFoundError:  # the folder was removed by a finishing trainer in between
            continue
        if handle is None:
            raise FileSafetyError(f"{path} is locked by another trainer on the same checkpoint folder "
                                  f"({lock_holder(path)}); stop that process first, or wait for it to finish")
        try:
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break  # the file at the path, not one a finishing trainer unlinked after we opened it
        except FileNotFoundError:
            pass
        os.close(handle)
    try:
        yield path
    finally:
        try:
            path.unlink()
            if not any(checkpoint_dir.iterdir()):
                checkpoint_dir.rmdir()
        except OSError:
            pass  # another trainer's lock file appeared in between: the folder stays
        os.close(handle)


def _save_checkpoint(checkpoint_dir: Path, state: dict, previous_best_epoch: int | None) -> None:
    """Rotate ``last.pt`` to ``previous.pt``, write the new ``last.pt``, then delete best-weight files
    that neither refers to. The best weights of ``state`` must already be on disk.

    Besides the model's and optimiser's state dicts, ``state`` is stored as tensors and plain data (numpy
    scalars made Python numbers), so ``last.pt`` loads with ``weights_only=True``."""
    last = checkpoint_dir / "last.pt"
    if last.exists():
        last.replace(checkpoint_dir / "previous.pt")
    # The state dicts as torch returns them: plain_data would turn them into dicts without the modules'
    # version _metadata that load_state_dict reads.
    dicts = ("model", "optimiser")
    atomic_torch_save({**plain_data({k: v for k, v in state.items() if k not in dicts}),
                       **{k: state[k] for k in dicts if k in state}}, last)
    keep = {_best_path(checkpoint_dir, epoch) for epoch in (state["best"]["epoch"], previous_best_epoch) if epoch}
    for path in checkpoint_dir.glob("best-epoch*.pt"):
        if path not in keep:
            path.unlink()


class _Sigterm:
    """A SIGTERM noted by its handler and acted on by :meth:`check` between training steps and after
    each epoch's checkpoint. Raising from the handler itself could land inside ``torch.save``, whose
    clean-up then fails with its own error instead of a clean stop."""

    def __init__(self):
        self.signum: int | None = None

    def note(self, signum: int, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        """Raise :class:`TrainingInterrupted` if a SIGTERM arrived."""
        if self.signum is not None:
            raise TrainingInterrupted(self.signum, f"received {signal.Signals(self.signum).name}")


@contextmanager
def _noting_sigterm():
    """A :class:`_Sigterm` that the process's SIGTERM handler feeds while training runs (main thread only)."""
    sigterm = _Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield sigterm
        return
    before = signal.signal(signal.SIGTERM, sigterm.note)
    try:
        yield sigterm
    finally:
        signal.signal(signal.SIGTERM, before)


def _stage1_record(method: str, dataset: str, seed: int, stage1_model: Path | None,
                   pseudo_masks: Path | None) -> dict:
    """The first stage's ``model.pt`` record that a method trained on pseudo masks builds on, checked
    to be of the same method, dataset and seed (the pseudo-mask folder is checked by its dataset)."""
    if stage1_model is None or pseudo_masks is None:
        raise ValueError(f"{method} trains on its first stage's pseudo masks: give stage1_model (the stage-1 "
                         "model.pt, `train --stage 1`) and pseudo_masks (the folder of `pseudo-masks`)")
    record = load_torch_file(stage1_model, "model file")
    found = (record["method"], record.get("stage"), record["dataset"], record["seed"])
    if found != (method, 1, dataset, seed):
        raise ValueError(f"{stage1_model}: a model of (method, stage, dataset, seed) {found}; expected "
                         f"{(method, 1, dataset, seed)}")
    return record


def train(method: str, dataset: str, data_root: Path, out_dir: Path, checkpoint_dir: Path, seed: int = 0,
          hparams: dict[str, Any] | None = None, settings: TrainSettings | None = None,
          stage: int | None = None, stage1_model: Path | None = None, pseudo_masks: Path | None = None) -> dict:
    """Train ``method`` on ``dataset`` and write into ``out_dir``: ``model.pt`` (best epoch's weights
    with its metadata), ``history.csv`` (one row per epoch) and ``run.json`` (resolved settings,
    environment, best epoch, wall time). Resumes from ``checkpoint_dir`` when it holds a checkpoint of
    this exact run. Returns the run record.

    ``stage=1`` trains the first stage of a two-stage method. The method itself then trains on the
    ``pseudo_masks`` folder written from that stage's ``stage1_model``, whose classifier it starts from.

    The whole run holds :func:`checkpoint_lock` on ``checkpoint_dir``: a second trainer there fails at once.
    """
    with checkpoint_lock(Path(checkpoint_dir)):
        return _train(method, dataset, data_root, out_dir, checkpoint_dir, seed, hparams, settings, stage,
                      stage1_model, pseudo_masks)


@dataclass
class _Run:
    """A run built and ready to fit: what :func:`_build` makes and the other steps of :func:`train` use."""

    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    train_loader: DataLoader
    select_loader: DataLoader
    seeded: EpochSeeded
    order: torch.Generator
    device: torch.device
    precision: str
    channels_last: bool
    settings: TrainSettings
    hparams: dict[str, Any]
    supervision: str
    environment: dict
    #: What a checkpoint must match to be resumed (method, data, seed, hparams, settings, optimiser groups).
    fingerprint: dict
    #: The dataset's tissue classes (the model's outputs; the background is the index after them).
    num_classes: int


@dataclass
class _Progress:
    """The state of training that a checkpoint carries from one epoch (or one job) to the next."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_mIoU": float("-inf")})
    start_epoch: int = 1
    train_seconds: float = 0.0


def _train(method: str, dataset: str, data_root: Path, out_dir: Path, checkpoint_dir: Path, seed: int,
           hparams: dict[str, Any] | None, settings: TrainSettings | None, stage: int | None,
           stage1_model: Path | None, pseudo_masks: Path | None) -> dict:
    """:func:`train`, with the checkpoint folder locked: build, resume, fit, write."""
    started = time.time()
    checkpoint_dir = Path(checkpoint_dir)
    spec = get_dataset_spec(dataset)  # a shipped dataset's name or a description file's path
    dataset = spec.name
    run = _build(method, spec, data_root, seed, dict(hparams or {}), settings or TrainSettings(), stage,
                 stage1_model, pseudo_masks)
    progress = _resume(run, checkpoint_dir)
    resumed_after_epoch = progress.start_epoch - 1
    _fit(run, progress, checkpoint_dir, seed, dataset)
    record = {
        "pathmamba_version": __version__,
        "method": method, "stage": stage, "dataset": dataset, "dataset_description": spec.description,
        "seed": seed, "supervision": run.supervision,
        "hparams": run.hparams, "stage1_model": stage1_model, "pseudo_masks": pseudo_masks,
        "settings": asdict(run.settings), "data_root": str(data_root),
        "checkpoint_dir": str(checkpoint_dir), "resumed_after_epoch": resumed_after_epoch,
        "best_epoch": progress.best["epoch"], "best_val_mIoU": progress.best["val_mIoU"],
        "train_images": len(run.train_loader.dataset),
        "wall_seconds_this_run": round(time.time() - started, 2),
        "train_seconds_all_epochs": round(progress.train_seconds, 2),
        "environment": run.environment,
    }
    _write(run, progress, record, Path(out_dir), checkpoint_dir)
    return record


def _build(method: str, spec: DatasetSpec, data_root: Path, seed: int, hparams: dict[str, Any],
           settings: TrainSettings, stage: int | None, stage1_model: Path | None,
           pseudo_masks: Path | None) -> _Run:
    """Device, data, model, optimiser and the run's fingerprint; a setting this machine cannot follow or
    a wrong first-stage model fails here, before any training."""
    # Device, scan and precision first: the log's first line says what runs.
    device = resolve_device(settings.device)
    scan = select_scan(settings.scan, device)
    precision = resolve_precision(settings.precision, device)
    environment = environment_record(device, scan, precision)
    log.info("%s", describe_environment(environment))
    dataset = spec.name
    supervision = get_spec(method, stage).supervision
    stage1 = None
    if supervision == "pseudo":
        stage1 = _stage1_record(method, dataset, seed, stage1_model, pseudo_masks)
        hparams["stage1_hparams"] = stage1["hparams"]
    index = index_dataset(Path(data_root), spec)
    for note in index.tolerated:
        log.warning("dataset %s: %s", dataset, note)

    if settings.workers is None:
        settings = replace(settings, workers=default_workers(device))
    channels_last = settings.channels_last and device.type == "cuda"
    seed_everything(seed, settings.deterministic)
    model = build_method(method, num_classes=spec.num_classes, stage=stage, **hparams)
    if stage1 is not None:
        model.init_from_stage1(stage1["state_dict"])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Adam with L2 weight decay (the paper's), none on the parameters pathmamba.engine.optim exempts
    optimiser = adam(model, settings.lr, settings.weight_decay)
    train_loader, select_loader, seeded, order = _loaders(index, spec, supervision, settings, seed,
                                                         settings.workers, pin=device.type == "cuda",
                                                         pseudo_masks=pseudo_masks)
    # A retrained first stage (new weights, new pseudo masks) must not resume an old second stage, nor
    # an optimiser state of another parameter-group layout (load_state_dict would refuse it).
    fingerprint = {"method": method, "stage": stage, "dataset": dataset, "seed": seed, "hparams": hparams,
                   "settings": {k: v for k, v in asdict(settings).items() if k not in NOT_FINGERPRINTED},
                   "stage1_sha256": file_sha256(stage1_model) if stage1 is not None else None,
                   "optimiser_groups": [[group["weight_decay"], len(group["params"])]
                                        for group in optimiser.param_groups]}
    return _Run(model, optimiser, train_loader, select_loader, seeded, order, device, precision, channels_last,
                settings, hparams, supervision, environment, fingerprint, spec.num_classes)


def _resume(run: _Run, checkpoint_dir: Path) -> _Progress:
    """The progress of the checkpoint of this exact run in ``checkpoint_dir``, its weights, optimiser
    and random state restored into ``run``; a fresh start when there is none."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state, resumed_from = _resume_state(checkpoint_dir, run.fingerprint)
    if state is None:
        return _Progress()
    run.model.load_state_dict(state["model"])
    run.optimiser.load_state_dict(state["optimiser"])
    restore_rng_state(state["rng"])
    log.info("resuming from %s after epoch %d", resumed_from, state["epoch"])
    return _Progress(state["history"], state["best"], state["epoch"] + 1, state["train_seconds"])


def _fit(run: _Run, progress: _Progress, checkpoint_dir: Path, seed: int, dataset: str) -> None:
    """Train from ``progress.start_epoch`` to the last epoch, selecting on val and writing a checkpoint
    after every epoch; ``progress`` is updated in place. SIGTERM stops it between steps."""
    epochs = run.settings.epochs
    with _noting_sigterm() as sigterm:
        try:
            for epoch in range(progress.start_epoch, epochs + 1):
                epoch_started = time.time()
                run.seeded.set_epoch(epoch)
                run.order.manual_seed(derived_seed(seed, epoch))
                # Per-epoch state derived from the weights (SC-CAM's clustering, WSSS-Tissue's dropout threshold);
                # recomputed on resume from the restored checkpoint, so it is the same as without a kill.
                if isinstance(run.model, EpochAware):
                    run.model.on_epoch_start(epoch, run.train_loader, run.device, dataset)
                steps = len(run.train_loader)
                row = _train_epoch(run.model, run.optimiser, run.train_loader, run.device, epoch, epochs,
                                   run.channels_last, run.precision, between_steps=sigterm.check,
                                   lr_factor_at=lambda step, first=(epoch - 1) * steps, total=epochs * steps:
                                   lr_factor(run.settings.lr_schedule, first + step, total))
                meter = predict_split(run.model, run.select_loader, run.device, run.num_classes, selection=True,
                                      channels_last=run.channels_last,
                                      precision=run.precision)
                scores = meter.summary()["ignore_background"]
                row.update(val_mIoU=scores["mIoU"], val_mDice=scores["mDice"])
                progress.history.append(row)
                previous_best_epoch = progress.best["epoch"]
                # The first selectable epoch is always kept, so a run whose val mIoU is nan still has a model.
                improved = (run.settings.selection == "last" or (selectable_epoch(run.model, epoch, epochs) and (
                    progress.best["epoch"] == 0 or scores["mIoU"] > progress.best["val_mIoU"])))
                if improved:
                    progress.best = {"epoch": epoch, "val_mIoU": scores["mIoU"]}
                    atomic_torch_save(run.model.state_dict(), _best_path(checkpoint_dir, epoch))
                progress.train_seconds += time.time() - epoch_started
                _save_checkpoint(checkpoint_dir, {
                    "model": run.model.state_dict(), "optimiser": run.optimiser.state_dict(), "epoch": epoch,
                    "best": progress.best, "history": progress.history, "rng": rng_state(),
                    "train_seconds": progress.train_seconds, "fingerprint": run.fingerprint}, previous_best_epoch)
                log.info("epoch %d/%d loss %.4f val mIoU %.4f%s  %.1f img/s  %.1f s  peak %.0f MB  run ETA %s",
                         epoch, epochs, row["loss"], scores["mIoU"],
                         f" ({run.settings.selection})" if improved else "",
                         row["images_per_s"], row["seconds"], row["peak_memory_mb"],
                         format_duration(progress.train_seconds / epoch * (epochs - epoch)))
                sigterm.check()
        except TrainingDiverged as diverged:
            message = _diverged_message(diverged, run.settings, progress, checkpoint_dir)
            log.error(message)
            raise TrainingDiverged(message) from None
        except TrainingInterrupted as interrupted:
            done = progress.history[-1]["epoch"] if progress.history else 0
            message = (f"{interrupted}: stopped during epoch {done + 1}; "
                       + (f"{checkpoint_dir / 'last.pt'} holds epoch {done}, a rerun resumes from it"
                          if done else "no epoch was complete, a rerun starts from scratch"))
            log.error(message)
            raise TrainingInterrupted(interrupted.signum, message) from None


def _diverged_message(diverged: TrainingDiverged, settings: TrainSettings, progress: _Progress,
                      checkpoint_dir: Path) -> str:
    """What a diverged run's job says: where it diverged, that nothing was written, what to change."""
    done = progress.history[-1]["epoch"] if progress.history else 0
    kept = (f"{checkpoint_dir / 'last.pt'} holds epoch {done}, the last finite one" if done
            else "no epoch was complete")
    return (f"training diverged at {diverged}; no model.pt written, the run has no result ({kept}); lower "
            f"train.lr (now {settings.lr:g}) or check the data and hparams: a rerun with the same settings "
            "diverges again, one with other settings starts afresh")


def _write(run: _Run, progress: _Progress, record: dict, out_dir: Path, checkpoint_dir: Path) -> None:
    """``model.pt`` (the best epoch's weights), ``history.csv`` and ``run.json`` (``record``) into
    ``out_dir``; then the finished run's checkpoints are removed."""
    best = progress.best
    best_weights = torch.load(_best_path(checkpoint_dir, best["epoch"]), map_location="cpu", weights_only=True)
    # The training images' (height, width): what `predict` tiles larger images into.
    input_size = list(run.train_loader.dataset[0][0].shape[-2:])
    # Tensors and plain data only: model.pt loads with weights_only=True (pathmamba.core.torch_files.load_torch_file).
    metadata = plain_data({**{key: record[key] for key in ("method", "stage", "hparams", "dataset",
                                                          "dataset_description", "seed", "settings")},
                           "epoch": best["epoch"], "val_mIoU": best["val_mIoU"], "input_size": input_size})
    atomic_torch_save({**metadata, "state_dict": best_weights}, out_dir / MODEL)
    atomic_write_text(out_dir / HISTORY, csv_text(progress.history))
    atomic_write_json(out_dir / RUN_RECORD, record)
    _remove_checkpoints(checkpoint_dir)


def _remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete the checkpoint files of a finished run (this run's: the fingerprint matched or they were
    written by it) with the temporary files a killed write of them left. Folders moved aside
    (``superseded-*``, ``unusable-*``) are kept; the lock's release removes the folder if it is empty."""
    for path in [checkpoint_dir / "last.pt", checkpoint_dir / "previous.pt", *checkpoint_dir.glob("best-epoch*.pt"),
                 *checkpoint_dir.glob(".last.pt.*.tmp"), *checkpoint_dir.glob(".best-epoch*.pt.*.tmp")]:
        path.unlink(missing_ok=True)
    log.info("run finished; removed its checkpoints from %s", checkpoint_dir)


def _train_epoch(model, optimiser, loader, device, epoch: int, epochs: int, channels_last: bool,
                 precision: str = "fp32", between_steps=lambda: None, lr_factor_at=lambda step: 1.0) -> dict:
    """One pass over ``loader``, calling ``between_steps()`` after each optimiser step; returns the
    epoch's row of ``history.csv`` (mean loss and parts, seconds, images/s, peak memory in MB, the last
    step's learning rate factor). ``precision``: a resolved precision
    (:func:`pathmamba.core.devices.resolve_precision`). ``lr_factor_at(step)``: the learning rate of the
    epoch's 0-based ``step``, as a fraction of each parameter group's configured one."""
    model.train()
    totals: dict[str, float] = {}
    seen, started = 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    interactive = sys.stderr.isatty()
    steps = len(loader)
    # About ten lines per epoch in the log, none closer than PROGRESS_SECONDS: a long epoch is not silent,
    # a short one adds nothing to its epoch line.
    every, logged = max(1, steps // 10), started
    for step, batch in enumerate(loader, 1):
        images = normalised_batch(batch[0], device, channels_last)
        targets = batch[1].to(device, non_blocking=True)
        with autocast(device, precision):
            loss, parts = model.loss(images, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = _finite_loss(model, loss, f"epoch {epoch}/{epochs}, step {step}/{steps}")
        factor = lr_factor_at(step - 1)
        for group in optimiser.param_groups:
            # The configured rate, kept in the group (and so in checkpoints) the first time it is scaled.
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        optimiser.step()
        between_steps()
        seen += len(images)
        for name, value in {"loss": loss_value, **parts}.items():
            totals[name] = totals.get(name, 0.0) + value * len(images)
        if interactive:
            print(f"\repoch {epoch}/{epochs} step {step}/{steps} loss {float(loss):.4f}",
                  end="", file=sys.stderr, flush=True)
        elif step % every == 0 and step < steps and time.time() - logged >= PROGRESS_SECONDS:
            logged = time.time()
            per_step = (logged - started) / step
            # The run's ETA counts training steps only, at this epoch's pace (validation adds a little).
            log.info("epoch %d/%d step %d/%d loss %.4f  %.1f img/s  epoch ETA %s  run ETA %s", epoch, epochs,
                     step, steps, totals["loss"] / seen, seen / (logged - started),
                     format_duration(per_step * (steps - step)),
                     format_duration(per_step * (steps - step + (epochs - epoch) * steps)))
    if interactive:
        print(file=sys.stderr)
    seconds = time.time() - started
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak_rss()) / 2**20
    return {"epoch": epoch, **{name: total / max(seen, 1) for name, total in totals.items()},
            "seconds": round(seconds, 3), "images_per_s": seen / max(seconds, 1e-9), "peak_memory_mb": peak,
            "lr_factor": factor}


def _finite_loss(model: torch.nn.Module, loss: torch.Tensor, where: str) -> float:
    """``loss`` as a number; raise :class:`TrainingDiverged` naming ``where`` (the epoch and step) when it or
    a gradient of ``model`` is nan or infinite, before the optimiser steps on it. Reads only: a finite
    run's numbers are unchanged (one reduction per step, the largest absolute gradient, read in the same
    device-to-host copy as the loss)."""
    grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads else torch.zeros(())
    loss_value, largest_value = (float(value) for value in torch.stack([loss.detach().float(),
                                                                        largest.to(loss.device)]).cpu())
    if not math.isfinite(loss_value):
        raise TrainingDiverged(f"{where}: the training loss is {loss_value}")
    if not math.isfinite(largest_value):
        raise TrainingDiverged(f"{where}: a gradient is {largest_value} (the loss is {loss_value:.4g})")
    return loss_value


def _cpu_peak_rss() -> float:
    """Peak resident memory of this process in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
