"""Bad input and faults of issue 26, one test per case: each ends in an error naming the thing at fault
(file, key, value, what is expected), or in a correct result, with nothing lost or half-written.

Covered: diverged training (item 1), config mistakes found by ``check_config`` before any job runs
(item 2), ``calibrate --out`` ownership (item 5), model files checked on load (item 6) and images of
every bit depth in ``predict`` (item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_error

from pathmamba import train as train_module
from pathmamba.train import TrainingDiverged, TrainSettings, train

TINY_CAM = {"backbone": "resnet18", "width": 8, "pretrained": "none"}
SIZE = 32


def _train_argv(data_root: Path, work: Path, settings: dict, hparams: dict = TINY_CAM) -> list[str]:
    return ["train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(data_root),
            "--out", str(work / "run"), "--checkpoint-dir", str(work / "checkpoints"),
            "--hparams", json.dumps(hparams), "--settings", json.dumps({"device": "cpu", "batch_size": 4, **settings})]


# --- a diverged run is never a result (item 1) ------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0e12, float("inf")], ids=["lr-1e12", "lr-inf"])
def test_a_diverging_run_stops_naming_epoch_and_step_and_writes_nothing(canonical, tmp_path, capsys, lr,
                                                                        one_torch_thread):
    message = cli_error(_train_argv(canonical, tmp_path, {"epochs": 2, "lr": lr}), capsys)
    assert message.startswith("pathmamba train: training diverged at epoch 1/2, step ")
    assert ": the training loss is nan; no model.pt written, the run has no result (no epoch was complete); " \
           f"lower train.lr (now {lr:g})" in message
    assert not (tmp_path / "run").exists()  # no model.pt, history.csv or run.json for evaluate to score
    assert not (tmp_path / "checkpoints").exists()  # nothing of the run left: no epoch was complete


def test_a_run_diverging_after_a_finite_epoch_keeps_that_epochs_checkpoint(canonical, tmp_path, monkeypatch,
                                                                           one_torch_thread):
    check = train_module._check_finite

    def nan_in_epoch_2(model, loss, where):
        check(model, loss * float("nan") if where.startswith("epoch 2/") else loss, where)

    monkeypatch.setattr(train_module, "_check_finite", nan_in_epoch_2)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at epoch 2/3, step 1/2: the training loss is "
                                               rf"nan; no model.pt written, the run has no result \("
                                               rf"{tmp_path / 'checkpoints' / 'last.pt'} holds epoch 1, the last "
                                               "finite one\\)"):
        train("cam", "synthetic-luad", canonical, tmp_path / "run", tmp_path / "checkpoints", 0, TINY_CAM,
              TrainSettings(epochs=3, batch_size=4, lr=1e-3, device="cpu"))
    assert not (tmp_path / "run").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_a_non_finite_gradient_under_a_finite_loss_is_named():
    model = torch.nn.Linear(2, 1)
    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    model.weight.grad[0, 1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^epoch 3/5, step 7/9: a gradient is inf \(the loss is -?\d"):
        train_module._check_finite(model, loss, "epoch 3/5, step 7/9")


def test_the_divergence_check_leaves_a_finite_run_bitwise_unchanged(canonical, tmp_path, monkeypatch,
                                                                    one_torch_thread):
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-3, device="cpu")
    train("cam", "synthetic-luad", canonical, tmp_path / "checked", tmp_path / "ck1", 0, TINY_CAM, settings)
    monkeypatch.setattr(train_module, "_check_finite", lambda model, loss, where: None)
    train("cam", "synthetic-luad", canonical, tmp_path / "unchecked", tmp_path / "ck2", 0, TINY_CAM, settings)
    checked, unchecked = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]
                          for name in ("checked", "unchecked"))
    assert checked.keys() == unchecked.keys()
    assert all(torch.equal(checked[key], unchecked[key]) for key in checked)
