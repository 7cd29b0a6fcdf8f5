"""Preemption: a training process stopped by SIGTERM, rerun and killed by SIGKILL mid-training, then
rerun to the end, gives exactly the result of an uninterrupted run."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.evaluate import evaluate
from pathmamba.train import TrainSettings, train

TINY_CAM = {"backbone": "resnet18", "width": 8}
# Enough epochs that a kill sent right after a checkpoint lands before the run ends.
SETTINGS = {"epochs": 6, "batch_size": 8, "lr": 1e-3, "device": "cpu", "workers": 0}
TIMING_COLUMNS = ("seconds", "images_per_s", "peak_memory_mb")
# Convolutions may sum in another order with another thread count; every run here uses one thread.
THREADS = 1


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=32, n_val=4, n_test=4, size=32, seed=0)
    return root


def train_in_process(data_root: Path, work: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        train("cam", "synthetic-luad", data_root, work / "run", work / "checkpoints", 0, TINY_CAM,
              TrainSettings(**SETTINGS))
    finally:
        torch.set_num_threads(threads)


def result(data_root: Path, work: Path) -> str:
    """History without timings and both test protocols, as JSON text (so nan equals nan)."""
    with open(work / "run" / "history.csv") as handle:
        history = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    test = evaluate(work / "run" / "model.pt", data_root, work / "eval", n_masks=0, device="cpu")
    return json.dumps({"history": history, "test": test["protocols"]}, sort_keys=True)


def start_training(data_root: Path, work: Path, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pathmamba", "train", "--method", "cam", "--dataset", "synthetic-luad",
               "--data-root", str(data_root), "--out", str(work / "run"),
               "--checkpoint-dir", str(work / "checkpoints"), "--seed", "0", "--hparams", json.dumps(TINY_CAM),
               "--settings", json.dumps(SETTINGS), "--threads", str(THREADS)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, stderr=open(log_path, "w"), stdout=subprocess.DEVNULL, env=env)


def wait_for_checkpoint_after(process: subprocess.Popen, last: Path, epoch: int, timeout: float = 600) -> int:
    """Poll ``last`` until it holds an epoch later than ``epoch`` and return that epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training exited early with {process.returncode}"
        if last.exists():
            try:
                done = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
            except (OSError, RuntimeError, EOFError):  # replaced while being read: look again
                done = epoch
            if done > epoch:
                return done
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after epoch {epoch} in {last} within {timeout} s")


def test_sigterm_then_sigkill_then_rerun_equals_an_uninterrupted_run(data_root, tmp_path, caplog):
    reference = tmp_path / "reference"
    train_in_process(data_root, reference)
    expected = result(data_root, reference)

    work = tmp_path / "preempted"
    last = work / "checkpoints" / "last.pt"

    # SIGTERM (SLURM's warning before its kill): stop at once, keep the checkpoint, exit non-zero.
    process = start_training(data_root, work, tmp_path / "first.log")
    terminated_after = wait_for_checkpoint_after(process, last, 0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    first_log = (tmp_path / "first.log").read_text()
    assert "received SIGTERM" in first_log and "a rerun resumes from it" in first_log
    kept = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert kept >= terminated_after
    assert not (work / "run" / "model.pt").exists()

    # Rerun, then SIGKILL (no chance to clean up) as soon as it has written one more epoch.
    process = start_training(data_root, work, tmp_path / "second.log")
    killed_after = wait_for_checkpoint_after(process, last, kept)
    process.kill()
    process.wait(timeout=120)
    assert f"resuming from {last} after epoch {kept}" in (tmp_path / "second.log").read_text()
    assert killed_after < SETTINGS["epochs"]

    # The last rerun finishes the run: same history and same test metrics as the uninterrupted run.
    with caplog.at_level(logging.INFO, logger="pathmamba.train"):
        train_in_process(data_root, work)
    assert f"resuming from {last} after epoch " in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == SETTINGS["epochs"]
    resumed = result(data_root, work)
    print(f"SIGTERM after epoch {kept}, SIGKILL after epoch {killed_after}; resumed == uninterrupted: "
          f"{resumed == expected}\n{expected}")
    assert resumed == expected
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["resumed_after_epoch"] >= killed_after
