"""Which epochs model selection may keep: every epoch by default, only the final one for SC-CAM (its
original keeps a fixed epoch of its last round), the final one always."""

import json

import pytest
import torch

import pathmamba.engine.train as train_module
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.registry import SelectsEpochs, build_method, selectable_epoch
from pathmamba.engine.train import TrainSettings, train

TINY = {"backbone": "resnet18", "width": 8}


def test_selectable_epochs_default_to_all_and_sccam_declares_only_its_final_epoch():
    cam = build_method("cam", 4, **TINY)
    sccam = build_method("sc-cam", 4, **TINY, cam_epochs=15, round_epochs=[31, 41, 51])
    assert not isinstance(cam, SelectsEpochs) and isinstance(sccam, SelectsEpochs)
    assert all(selectable_epoch(cam, epoch, 138) for epoch in range(1, 139))
    assert [epoch for epoch in range(1, 139) if selectable_epoch(sccam, epoch, 138)] == [138]
    # The original's schedule: clusterings with the CAM of epoch 15, round 1's 31st and round 2's 41st epoch.
    assert sccam.clustering_epochs == (16, 47, 88)


class NeverSelectable(torch.nn.Module):
    def selectable_epoch(self, epoch, epochs):
        return False


def test_the_final_epoch_is_always_selectable_so_every_run_ends_with_a_model():
    assert [epoch for epoch in range(1, 6) if selectable_epoch(NeverSelectable(), epoch, 5)] == [5]


class FallingScores:
    """A val meter whose mIoU falls from epoch to epoch: best-on-val keeps epoch 1."""

    calls = 0

    def __init__(self, *args, **kwargs):
        FallingScores.calls += 1
        self.score = 1.0 / FallingScores.calls

    def summary(self):
        return {"ignore_background": {"mIoU": self.score, "mDice": self.score}}


@pytest.mark.parametrize(("method", "hparams", "kept"), [
    ("cam", {}, 1), ("sc-cam", {"subcategories": 2, "cam_epochs": 1, "round_epochs": [1, 1]}, 3)])
def test_the_engine_keeps_the_best_selectable_epoch(method, hparams, kept, tmp_path, monkeypatch):
    root = tmp_path / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=16, n_val=4, n_test=4, size=32, seed=0)
    monkeypatch.setattr(FallingScores, "calls", 0)
    monkeypatch.setattr(train_module, "predict_split", FallingScores)
    settings = TrainSettings(epochs=3, batch_size=8, lr=1e-3, device="cpu")
    train(method, "synthetic-luad", root, tmp_path / "run", tmp_path / "ckpt", 0, {**TINY, **hparams}, settings)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["best_epoch"] == kept
