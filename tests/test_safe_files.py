"""Files the tool did not write are never deleted, and its own model and checkpoint files are tensors and
plain data (``torch.load(weights_only=True)``), never arbitrary pickles: pseudo-mask folders, checkpoints
of other settings, the checkpoint-folder lock, and loading files."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, train_preempted_after

from pathmamba.core.errors import FileSafetyError
from pathmamba.core.torch_files import load_torch_file
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.pseudo_masks import write_pseudo_masks
from pathmamba.engine.train import LOCK_FILE, TrainSettings, checkpoint_lock, fingerprint_id, train

TINY_CAM = {"backbone": "resnet18", "width": 8, "pretrained": "none"}
TINY_STAGE1 = {"backbone": "resnet18", "width": 8, "pretrained": "none", "output_stride": 8}
SETTINGS = TrainSettings(epochs=1, batch_size=8, lr=1e-3, device="cpu", workers=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=8, n_val=4, n_test=2, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def stage1_model(data_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("stage1")
    train("wsss-tissue", "synthetic-luad", data_root, work / "run", work / "checkpoints", 0, TINY_STAGE1,
          SETTINGS, stage=1)
    return work / "run" / "model.pt"


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# --- pseudo-mask folders ------------------------------------------------------------------------------

def test_pseudo_masks_refuse_a_foreign_folder_and_replace_their_own(stage1_model, data_root, tmp_path, capsys):
    out = tmp_path / "masks"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    (out / "layer4").mkdir()
    (out / "layer4" / "scan.png").write_bytes(b"not ours")
    before = digests(out)
    with pytest.raises(FileSafetyError, match=f"{out} exists and is not a pseudo-mask folder written by this tool"):
        write_pseudo_masks(stage1_model, data_root, out, device="cpu")
    # Through the CLI: one line, no traceback.
    message = cli_error(["pseudo-masks", "--model", str(stage1_model), "--data-root", str(data_root), "--out",
                         str(out), "--device", "cpu"], capsys)
    assert "\n" not in message and str(out) in message and "no pseudo-mask manifest.json" in message
    assert digests(out) == before

    # Our own earlier output is replaced, and nothing is left beside it.
    fresh = tmp_path / "ours"
    first = write_pseudo_masks(stage1_model, data_root, fresh, device="cpu")
    assert first["images"] == 8 and (fresh / "manifest.json").exists()
    written = digests(fresh)
    (fresh / "layer4" / min(os.listdir(fresh / "layer4"))).write_bytes(b"stale")  # changed since
    write_pseudo_masks(stage1_model, data_root, fresh, device="cpu")
    assert digests(fresh) == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["masks", "ours"]  # no temporary siblings

    # Our output with a user's file added is no longer only ours: refused, left as it is.
    (fresh / "notes.txt").write_text("added by hand")
    with pytest.raises(FileSafetyError, match=r"holds notes\.txt besides the pseudo masks"):
        write_pseudo_masks(stage1_model, data_root, fresh, device="cpu")
    assert (fresh / "notes.txt").read_text() == "added by hand"


# --- checkpoints of other settings --------------------------------------------------------------------

def test_checkpoint_of_other_settings_is_moved_aside_intact(data_root, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    short = TrainSettings(epochs=4, batch_size=8, lr=1e-3, device="cpu", workers=0)
    train_preempted_after(1, "cam", "synthetic-luad", data_root, tmp_path / "run", checkpoints, seed=0,
                          hparams=TINY_CAM, settings=short)
    kept = digests(checkpoints)
    assert "last.pt" in kept and LOCK_FILE not in kept  # the stopped trainer released and removed its lock
    # Tensors and plain data: loads without unpickling arbitrary objects.
    state = torch.load(checkpoints / "last.pt", map_location="cpu", weights_only=True)
    fingerprint = state["fingerprint"]

    # Another seed on the same folder: the checkpoint is not resumed, and not deleted either.
    with caplog.at_level(logging.INFO, logger="pathmamba.engine.train"):
        train("cam", "synthetic-luad", data_root, tmp_path / "other", checkpoints, 1, TINY_CAM, SETTINGS)
    aside = checkpoints / f"superseded-{fingerprint_id(fingerprint)}"
    assert "belongs to other settings" in caplog.text and f"to {aside}" in caplog.text
    assert "resuming from" not in caplog.text.replace("not resuming from it", "")
    assert digests(aside) == kept  # last.pt, previous.pt (if written) and their best weights, intact
    # The finished run removed only its own checkpoints (and its lock).
    assert [path.name for path in checkpoints.iterdir()] == [aside.name]
    model = torch.load(tmp_path / "other" / "model.pt", map_location="cpu", weights_only=True)
    assert model["seed"] == 1 and isinstance(model["val_mIoU"], float)


def test_checkpoint_of_an_older_version_is_moved_aside_not_unpickled(data_root, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    # Pickled numpy state as checkpoints held before: not loadable as tensors and plain data.
    torch.save({"epoch": 1, "rng": {"numpy": np.random.get_state()}}, checkpoints / "last.pt")
    before = (checkpoints / "last.pt").read_bytes()
    with caplog.at_level(logging.INFO, logger="pathmamba.engine.train"):
        train("cam", "synthetic-luad", data_root, tmp_path / "run", checkpoints, 0, TINY_CAM, SETTINGS)
    assert f"checkpoint {checkpoints / 'last.pt'} is unusable (FileSafetyError" in caplog.text
    (aside,) = checkpoints.iterdir()
    assert aside.name.startswith("unusable-") and (aside / "last.pt").read_bytes() == before


# --- the checkpoint-folder lock -----------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
handle = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(handle, f"pid {os.getpid()} host test".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_second_trainer_on_a_locked_checkpoint_folder_fails_at_once(data_root, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    with checkpoint_lock(checkpoints):
        with pytest.raises(FileSafetyError, match=rf"{checkpoints / LOCK_FILE} is locked by another trainer .*"
                                                  rf"\(pid {os.getpid()} host "):
            train("cam", "synthetic-luad", data_root, tmp_path / "run", checkpoints, 0, TINY_CAM, SETTINGS)
        assert not (tmp_path / "run").exists()

    # Held by another process (a trainer that outlived a killed Snakemake): the CLI says so in one line;
    # once that process is SIGKILLed the kernel releases the lock.
    checkpoints.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(checkpoints / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        message = cli_error(["train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(data_root),
                             "--out", str(tmp_path / "run"), "--checkpoint-dir", str(checkpoints), "--hparams",
                             json.dumps(TINY_CAM), "--settings", json.dumps({"device": "cpu", "epochs": 1})], capsys)
        assert time.monotonic() - started < 30
        assert "\n" not in message and str(checkpoints / LOCK_FILE) in message and f"pid {holder.pid}" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with checkpoint_lock(checkpoints) as lock:
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
    assert not checkpoints.exists()  # nothing else in it: the lock's release removed the folder


# --- loading files ------------------------------------------------------------------------------------

class NotPlainData:
    pass


def test_a_file_that_is_not_ours_is_refused_in_one_line(tmp_path, data_root, capsys):
    path = tmp_path / "model.pt"
    torch.save({"method": "cam", "payload": NotPlainData()}, path)
    with pytest.raises(FileSafetyError, match=f"{path}: not a model file of this tool") as refused:
        load_torch_file(path, "model file")
    assert "\n" not in str(refused.value)
    message = cli_error(["evaluate", "--model", str(path), "--data-root", str(data_root), "--out",
                         str(tmp_path / "eval"), "--device", "cpu"], capsys)
    assert "\n" not in message and f"{path}: not a model file of this tool" in message
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt", "model file")
