"""Preemption: a training process stopped by SIGTERM, rerun and killed by SIGKILL mid-training, then
rerun to the end, gives exactly the result of an uninterrupted run; and so does the whole pipeline
killed mid-training and recovered as README.md's "Interrupted runs" says."""

import contextlib
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, checkpoint_epoch
from test_workflow import run_snakemake, snakemake_command

from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import evaluate
from pathmamba.engine.train import TrainSettings, train

SYNTHETIC = {"n_train": 32, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}
TINY_CAM = {"backbone": "resnet18", "width": 8, "pretrained": "none"}
# Enough epochs that a kill sent right after a checkpoint lands before the run ends.
SETTINGS = {"epochs": 6, "batch_size": 8, "lr": 1e-3, "device": "cpu", "workers": 0}
TIMING_COLUMNS = ("seconds", "images_per_s", "peak_memory_mb")
# Convolutions may sum in another order with another thread count; every run here uses one thread.
THREADS = 1


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, **SYNTHETIC)
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
        if (done := checkpoint_epoch(last) or 0) > epoch:
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
    kept = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
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
    with caplog.at_level(logging.INFO, logger="pathmamba.engine.train"):
        train_in_process(data_root, work)
    # A SIGKILL between the rotation of last.pt to previous.pt and the new last.pt: previous.pt serves.
    assert re.search(rf"resuming from {work / 'checkpoints'}/(last|previous)\.pt after epoch ", caplog.text)
    assert not last.exists()  # the finished run removed its checkpoints
    resumed = result(data_root, work)
    print(f"SIGTERM after epoch {kept}, SIGKILL after epoch {killed_after}; resumed == uninterrupted: "
          f"{resumed == expected}\n{expected}")
    assert resumed == expected
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["resumed_after_epoch"] >= killed_after


# The same training run as one pipeline: one dataset, one method, one seed, up to the tables.
PIPELINE = {
    "experiment": "resume",
    "seeds": [0],
    "threads_per_job": THREADS,
    "datasets": {"synthetic-luad": {"synthetic": SYNTHETIC}},
    # More epochs than the in-process test: the kill must land before the run ends, and snakemake's
    # child process may start its epochs before the test's poll gets a turn on a loaded machine.
    "train": {**SETTINGS, "epochs": 20},
    "evaluate": {"n_masks": 0},
    "methods": {"cam": {"hparams": TINY_CAM}},
}
TABLES = ("comparison.csv", "table1_comparison.csv")
TARGETS = [f"results/resume/tables/{name}" for name in TABLES]
SEED0 = "synthetic-luad/cam/seed0"


def cam_miou(results: Path) -> str:
    with open(results / "tables" / "comparison.csv") as handle:
        return next(row["mIoU_mean"] for row in csv.DictReader(handle) if row["method"] == "cam")


@pytest.mark.e2e
def test_pipeline_killed_mid_training_resumes_and_gives_the_tables_of_an_uninterrupted_run(
        tmp_path, snakemake_bin, workflow_env):
    reference = tmp_path / "reference"
    reference.mkdir()
    finished = run_snakemake(snakemake_bin, workflow_env, reference, PIPELINE, *TARGETS)
    assert finished.returncode == 0, finished.stderr[-4000:]

    work = tmp_path / "killed"
    work.mkdir()
    results = work / "results" / "resume"
    last = results / "checkpoints" / SEED0 / "last.pt"
    # Snakemake in a process group of its own: one SIGKILL ends it and its training job together, as a
    # crashed node or a killed login session does, with no chance to clean up.
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(snakemake_command(snakemake_bin, work, PIPELINE, *TARGETS), stdout=log,
                                  stderr=subprocess.STDOUT, env=workflow_env, start_new_session=True)
    try:
        killed_after = wait_for_checkpoint_after(killed, last, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if snakemake exited early
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    assert killed_after < PIPELINE["train"]["epochs"]
    assert not (results / "runs" / SEED0 / "model.pt").exists()

    # The recovery of README.md's "Interrupted runs": the killed snakemake left its lock, which blocks
    # the rerun until `--unlock` removes it.
    locked = run_snakemake(snakemake_bin, workflow_env, work, PIPELINE, "--rerun-incomplete", *TARGETS)
    assert locked.returncode != 0
    assert "Directory cannot be locked" in locked.stderr and "--unlock" in locked.stderr
    unlocked = run_snakemake(snakemake_bin, workflow_env, work, PIPELINE, "--unlock")
    assert unlocked.returncode == 0, unlocked.stderr[-4000:]
    rerun = run_snakemake(snakemake_bin, workflow_env, work, PIPELINE, "--rerun-incomplete", *TARGETS)
    assert rerun.returncode == 0, rerun.stderr[-4000:]

    # The checkpoint, outside the rule's outputs, survived the rerun's clean-up: training resumed from it.
    train_log = (results / "logs" / SEED0 / "train.log").read_text()
    resumed = re.search(rf"resuming from results/resume/checkpoints/{SEED0}/(?:last|previous)\.pt after epoch (\d+)",
                        train_log)
    assert resumed, train_log
    resumed_after = int(resumed.group(1))
    assert resumed_after >= killed_after
    assert not last.exists()  # the finished run removed its checkpoints
    print(f"killed after epoch {killed_after}, resumed after epoch {resumed_after}; cam mIoU: uninterrupted "
          f"{cam_miou(reference / 'results' / 'resume')}, killed and resumed {cam_miou(results)}")
    # The tables hold no timings: every cell must be equal.
    for name in TABLES:
        expected = (reference / "results" / "resume" / "tables" / name).read_text()
        assert (results / "tables" / name).read_text() == expected, name
