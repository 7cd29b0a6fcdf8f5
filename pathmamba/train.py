"""The training engine shared by every registered method.

One run = one (method, dataset, seed). Adam with a fixed learning rate (the paper's protocol), the
model of the epoch with the best validation mIoU kept, a resumable checkpoint written atomically after
every epoch into ``checkpoint_dir`` (outside the workflow's declared outputs, so a killed job restarts
where it stopped and ends with the same result as an uninterrupted run).
"""

from __future__ import annotations

import csv
import io
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from pathmamba.data.datasets import ImageLabelDataset, ImageMaskDataset
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import NUM_CLASSES, get_dataset_spec
from pathmamba.evaluate import predict_split
from pathmamba.registry import build_method, get_spec
from pathmamba.runtime import (
    atomic_torch_save, atomic_write_json, atomic_write_text, environment_record, resolve_device,
    restore_rng_state, rng_state, seed_everything,
)

log = logging.getLogger("pathmamba.train")

#: Pixel-supervised methods train on val masks; this fixed split (independent of the run's seed) keeps
#: a fifth of val aside for model selection, the same images for every seed.
PIXEL_SPLIT_SEED = 0


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; defaults are the paper's (Adam, lr 1e-5, weight decay 5e-4, batch 16,
    100 epochs)."""

    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 5e-4
    augment: bool = True
    workers: int = 0
    device: str = "auto"
    deterministic: bool = False
    val_fraction: float = 0.2


def split_for_pixel_supervision(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """A fixed seeded split of ``n`` val images into (train, select) index lists."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(PIXEL_SPLIT_SEED)).tolist()
    n_select = max(1, round(n * val_fraction))
    return sorted(order[n_select:]), sorted(order[:n_select])


def _loaders(index, spec, supervision: str, settings: TrainSettings, generator: torch.Generator,
             pin: bool) -> tuple[DataLoader, DataLoader]:
    val = ImageMaskDataset(index.val, spec)
    if supervision == "image":
        train_set = ImageLabelDataset(index.train, augment=settings.augment)
        select_set = val
    else:
        fit, select = split_for_pixel_supervision(len(index.val), settings.val_fraction)
        train_set = Subset(ImageMaskDataset(index.val, spec, augment=settings.augment), fit)
        select_set = Subset(val, select)
    common = dict(num_workers=settings.workers, pin_memory=pin, persistent_workers=settings.workers > 0)
    train_loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=False,
                              generator=generator, **common)
    select_loader = DataLoader(select_set, batch_size=settings.batch_size, shuffle=False, **common)
    return train_loader, select_loader


def _load_checkpoint(path: Path, fingerprint: dict) -> dict | None:
    """The resumable state in ``path`` if it is readable and belongs to this exact run, else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or corrupt file: start over rather than crash in a loop
        log.warning("checkpoint %s is unreadable (%s); training from scratch", path, error)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s belongs to other settings; training from scratch", path)
        return None
    return state


def train(method: str, dataset: str, data_root: Path, out_dir: Path, checkpoint_dir: Path, seed: int = 0,
          hparams: dict[str, Any] | None = None, settings: TrainSettings = TrainSettings()) -> dict:
    """Train ``method`` on ``dataset`` and write into ``out_dir``: ``model.pt`` (best epoch's weights
    with its metadata), ``history.csv`` (one row per epoch) and ``run.json`` (settings, environment,
    best epoch, wall time). Returns the run record."""
    hparams = dict(hparams or {})
    spec = get_dataset_spec(dataset)
    supervision = get_spec(method).supervision
    index = index_dataset(Path(data_root), spec)
    for note in index.tolerated:
        log.warning("dataset %s: %s", dataset, note)

    device = resolve_device(settings.device)
    generator = seed_everything(seed, settings.deterministic)
    model = build_method(method, num_classes=NUM_CLASSES, **hparams).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    train_loader, select_loader = _loaders(index, spec, supervision, settings, generator,
                                           pin=device.type == "cuda")

    fingerprint = {"method": method, "dataset": dataset, "seed": seed, "hparams": hparams,
                   "settings": asdict(settings)}
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    history: list[dict] = []
    best = {"epoch": 0, "val_mIoU": float("-inf")}
    start_epoch = 1
    state = _load_checkpoint(last_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        restore_rng_state(state["rng"], generator)
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        log.info("resuming from %s after epoch %d", last_path, state["epoch"])

    started = time.time()
    for epoch in range(start_epoch, settings.epochs + 1):
        row = _train_epoch(model, optimiser, train_loader, device, epoch, settings.epochs)
        meter = predict_split(model, select_loader, device)
        scores = meter.summary()["ignore_background"]
        row.update(val_mIoU=scores["mIoU"], val_mDice=scores["mDice"])
        history.append(row)
        improved = scores["mIoU"] > best["val_mIoU"]
        if improved:
            best = {"epoch": epoch, "val_mIoU": scores["mIoU"]}
            atomic_torch_save(model.state_dict(), best_path)
        atomic_torch_save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch,
                           "best": best, "history": history, "rng": rng_state(generator),
                           "fingerprint": fingerprint}, last_path)
        log.info("epoch %d/%d loss %.4f val mIoU %.4f%s  %.1f img/s  peak %.0f MB", epoch, settings.epochs,
                 row["loss"], scores["mIoU"], " (best)" if improved else "", row["images_per_s"],
                 row["peak_memory_mb"])

    out_dir = Path(out_dir)
    record = {
        "method": method, "dataset": dataset, "seed": seed, "supervision": supervision,
        "hparams": hparams, "settings": asdict(settings), "best_epoch": best["epoch"],
        "best_val_mIoU": best["val_mIoU"], "train_images": len(train_loader.dataset),
        "wall_seconds_this_run": round(time.time() - started, 2),
        "environment": environment_record(device),
    }
    atomic_torch_save({"method": method, "hparams": hparams, "dataset": dataset, "seed": seed,
                       "epoch": best["epoch"], "val_mIoU": best["val_mIoU"],
                       "state_dict": torch.load(best_path, map_location="cpu", weights_only=True)},
                      out_dir / "model.pt")
    atomic_write_text(out_dir / "history.csv", _csv(history))
    atomic_write_json(out_dir / "run.json", record)
    return record


def _train_epoch(model, optimiser, loader, device, epoch: int, epochs: int) -> dict:
    model.train()
    totals: dict[str, float] = {}
    seen, started = 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    interactive = sys.stderr.isatty()
    for step, batch in enumerate(loader, 1):
        images = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, parts = model.loss(images, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        seen += len(images)
        for name, value in {"loss": float(loss.detach()), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value * len(images)
        if interactive:
            print(f"\repoch {epoch}/{epochs} step {step}/{len(loader)} loss {float(loss):.4f}",
                  end="", file=sys.stderr, flush=True)
    if interactive:
        print(file=sys.stderr)
    seconds = time.time() - started
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak_rss()) / 2**20
    return {"epoch": epoch, **{name: total / max(seen, 1) for name, total in totals.items()},
            "seconds": round(seconds, 3), "images_per_s": seen / max(seconds, 1e-9), "peak_memory_mb": peak}


def _cpu_peak_rss() -> float:
    """Peak resident memory of this process in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
