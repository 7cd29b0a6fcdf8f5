"""Benchmark: what the CPU instruction-set pins (pathmamba/core/cpu_pins.py) cost, side by side in one run.

Trains each of the demo's model families (its ``config/demo.yaml`` hparams, 64 px synthetic data, batch
16, one thread) for ``--epochs`` epochs in a fresh process with ``PATHMAMBA_CPU_PINS=avx2`` (the default)
and with ``native`` (each library's fastest paths on this CPU), alternating, ``--repeats`` times each;
the table gives the median seconds of the training epochs (from ``history.csv``: start-up and
evaluation excluded) and the pinned/native ratio.

    python -m benchmarks.cpu_pins                  # 3 repeats, 2 epochs
    python -m benchmarks.cpu_pins --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pathmamba.core import cpu_pins
from pathmamba.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
METHODS = ("cam", "sc-cam", "unet", "pathmamba-b", "pathmamba")
DATASET = "synthetic-luad"


def train_seconds(method: str, hparams: dict, data: Path, work: Path, epochs: int, pins: str) -> float:
    """Seconds of the training epochs of one fresh ``train`` call with the CPU pins ``pins``."""
    env = {**cpu_pins.child_environment(pins), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    settings = {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "device": "cpu", "workers": 0}
    out = work / f"{method}-{pins}"
    subprocess.run([sys.executable, "-m", "pathmamba", "train", "--method", method, "--dataset", DATASET,
                    "--data-root", str(data), "--out", str(out), "--checkpoint-dir", str(work / "checkpoints"),
                    "--hparams", json.dumps(hparams), "--settings", json.dumps(settings), "--threads", "1"],
                   check=True, env=env, cwd=REPO, capture_output=True)
    with open(out / "history.csv") as handle:
        return sum(float(row["seconds"]) for row in csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["methods"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        make_synthetic_dataset(DATASET, work / "data", n_train=160, n_val=24, n_test=8, size=64, seed=0)
        print(f"| method | pinned (avx2) s | native s | pinned / native |  ({args.epochs} epochs of 160 images, "
              f"median of {args.repeats})")
        print("|---|---|---|---|")
        for method in METHODS:
            times: dict[str, list[float]] = {"avx2": [], "native": []}
            for _ in range(args.repeats):
                for pins, seconds in times.items():
                    seconds.append(train_seconds(method, demo[method]["hparams"], work / "data", work, args.epochs,
                                                 pins))
            pinned, native = (statistics.median(times[pins]) for pins in ("avx2", "native"))
            print(f"| {method} | {pinned:.2f} | {native:.2f} | {pinned / native:.2f} |", flush=True)


if __name__ == "__main__":
    main()
