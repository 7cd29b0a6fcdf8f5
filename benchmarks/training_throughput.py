"""Benchmark: training throughput of the real engine (``pathmamba.engine.train.train``) at the demo's size.

For CAM and PathMamba with the hyper-parameters of ``config/demo.yaml`` on a synthetic dataset of the
demo's image size, trains a few epochs with 0 and 1 data loader workers (on CUDA also with and
without channels_last) and prints a markdown table of training images per second (mean over the
epochs after the first, which pays for warm-up), the final loss (equal across worker counts: the
augmentation does not depend on them) and the load average before and after, since the numbers are
only meaningful on a calm machine.

    python -m benchmarks.training_throughput                      # CPU: about 2 minutes on 2 cores
    python -m benchmarks.training_throughput --device cuda --n-train 512 --size 224
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
from pathlib import Path

import torch
import yaml

from pathmamba.core.devices import resolve_device
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.train import TrainSettings, train

REPO = Path(__file__).resolve().parents[1]


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def measure(method: str, hparams: dict, data_root: Path, work: Path, settings: TrainSettings) -> dict:
    """Train once; returns images/s (mean over epochs 2..), seconds per epoch and the final loss."""
    train(method, "synthetic-luad", data_root, work / "run", work / "checkpoints", 0, hparams, settings)
    with open(work / "run" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    timed = rows[1:] or rows
    return {
        "images_per_s": sum(float(row["images_per_s"]) for row in timed) / len(timed),
        "epoch_seconds": sum(float(row["seconds"]) for row in timed) / len(timed),
        "final_loss": float(rows[-1]["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["cam", "pathmamba"])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--size", type=int, default=None, help="image side; default the demo's")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default torch's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = demo_config()
    size = args.size or config["datasets"]["synthetic-luad"]["synthetic"]["size"]
    device = resolve_device(args.device)
    layouts = [True, False] if device.type == "cuda" else [False]
    load_before = os.getloadavg()

    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        data_root = Path(tmp) / "data"
        make_synthetic_dataset("synthetic-luad", data_root, n_train=args.n_train, n_val=8, n_test=2, size=size)
        for method in args.methods:
            hparams = config["methods"][method]["hparams"]
            for workers in (0, 1):
                for channels_last in layouts:
                    settings = TrainSettings(epochs=args.epochs, batch_size=config["train"]["batch_size"],
                                             lr=config["train"]["lr"], device=args.device, workers=workers,
                                             channels_last=channels_last)
                    work = Path(tmp) / f"{method}-{workers}-{channels_last}"
                    rows.append({"method": method, "workers": workers, "channels_last": channels_last,
                                 **measure(method, hparams, data_root, work, settings)})

    load_after = os.getloadavg()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, {args.n_train} images of {size} px, batch "
          f"{config['train']['batch_size']}, {args.epochs} epochs, demo hparams")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}, on {os.cpu_count()} CPUs\n")
    print("| method | workers | channels_last | train images/s | s/epoch | final loss |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['workers']} | {row['channels_last']} | {row['images_per_s']:.1f} | "
              f"{row['epoch_seconds']:.2f} | {row['final_loss']:.6f} |")


if __name__ == "__main__":
    main()
