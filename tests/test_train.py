"""The training engine: determinism, corrupt checkpoints, channels_last, pretrained weights."""

import csv
import functools
import hashlib
import http.server
import itertools
import json
import logging
import threading
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import train_preempted_after

from pathmamba.cli import main as cli_main
from pathmamba.core.download import DownloadFailed, download_file
from pathmamba.core.files import file_sha256
from pathmamba.core.settings import lr_factor
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import evaluate
from pathmamba.engine.registry import build_method
from pathmamba.engine.train import TrainSettings, train
from pathmamba.models.backbones import RESNETS, build_resnet, resnet_stages, stage_channels

TINY_CAM = {"backbone": "resnet18", "width": 8}
SETTINGS = TrainSettings(epochs=3, batch_size=8, lr=1e-3, device="cpu")  # workers unset: 0 on CPU
#: history.csv columns that are measurements of speed, not results.
TIMING_COLUMNS = ("seconds", "images_per_s", "peak_memory_mb")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=16, n_val=4, n_test=4, size=32, seed=0)
    return root


def run_and_evaluate(data_root: Path, work: Path, seed: int = 0, settings: TrainSettings = SETTINGS) -> dict:
    """Train tiny CAM into ``work`` (checkpoints in ``work/checkpoints``) and evaluate it on test.

    Returns {"history": rows without timing columns, "test": both protocols' metrics}.
    """
    train("cam", "synthetic-luad", data_root, work / "run", work / "checkpoints", seed, TINY_CAM, settings)
    with open(work / "run" / "history.csv") as handle:
        history = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    test = evaluate(work / "run" / "model.pt", data_root, work / "eval", n_masks=0, device="cpu")
    # Through JSON so that nan (a class absent from the tiny test split) compares equal to nan.
    return json.loads(json.dumps({"history": history, "test": test["protocols"]}).replace("NaN", '"nan"'))


@pytest.fixture(scope="module")
def seed0_work(data_root, tmp_path_factory) -> Path:
    """An uninterrupted run with seed 0; its result is in ``result.json``."""
    work = tmp_path_factory.mktemp("seed0")
    (work / "result.json").write_text(json.dumps(run_and_evaluate(data_root, work)))
    return work


@pytest.fixture(scope="module")
def seed0_run(seed0_work) -> dict:
    return json.loads((seed0_work / "result.json").read_text())


def test_same_seed_gives_identical_metrics_with_any_workers_and_other_seeds_differ(data_root, tmp_path,
                                                                                    seed0_run):
    # One loader worker instead of none: augmentation and order depend on (seed, epoch, image) only.
    again = run_and_evaluate(data_root, tmp_path / "again", settings=replace(SETTINGS, workers=1))
    assert again == seed0_run
    other = run_and_evaluate(data_root, tmp_path / "other", seed=1)
    print("test mIoU seed 0, 0 workers: {}; seed 0, 1 worker: {}; seed 1: {}".format(
        *(run["test"]["ignore_background"]["mIoU"] for run in (seed0_run, again, other))))
    assert other["history"] != seed0_run["history"]
    assert other["test"] != seed0_run["test"]


def test_truncated_checkpoint_falls_back_to_the_previous_one_then_to_scratch(data_root, tmp_path, seed0_run, caplog):
    work = tmp_path / "work"
    checkpoints = work / "checkpoints"
    kept = train_preempted_after(2, "cam", "synthetic-luad", data_root, work / "run", checkpoints, seed=0,
                                 hparams=TINY_CAM, settings=SETTINGS)
    names = {path.name for path in checkpoints.iterdir()}
    best = {f"best-epoch000{epoch}.pt" for epoch in (1, 2, 3)}
    assert {"last.pt", "previous.pt"} <= names <= {"last.pt", "previous.pt", *best}

    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short, as a full disk leaves it
    with caplog.at_level(logging.INFO, logger="pathmamba.engine.train"):
        assert run_and_evaluate(data_root, work) == seed0_run
    assert f"checkpoint {last} is unusable" in caplog.text
    assert f"resuming from {checkpoints / 'previous.pt'} after epoch {kept - 1}" in caplog.text

    # The finished run removed its checkpoints; preempted again, both checkpoint files damaged.
    train_preempted_after(2, "cam", "synthetic-luad", data_root, work / "run", checkpoints, seed=0,
                          hparams=TINY_CAM, settings=SETTINGS)
    caplog.clear()
    for name in ("last.pt", "previous.pt"):
        (checkpoints / name).write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="pathmamba.engine.train"):
        assert run_and_evaluate(data_root, work) == seed0_run
    assert f"no usable checkpoint in {checkpoints}; training from scratch" in caplog.text
    assert "resuming" not in caplog.text


def test_finished_run_removes_its_checkpoints(seed0_work):
    # Nothing left to resume from: a forced rerun (after a code change, say) trains again.
    assert not (seed0_work / "checkpoints").exists()


def test_run_json_records_resolved_settings_environment_and_wall_time(seed0_work):
    record = json.loads((seed0_work / "run" / "run.json").read_text())
    assert record["settings"]["workers"] == 0  # unset -> resolved: none on the CPU
    assert record["hparams"] == TINY_CAM and record["resumed_after_epoch"] == 0
    assert record["environment"]["device"] == "cpu"
    # What ran, not what was asked: `auto` resolved on this CPU machine.
    assert record["settings"]["scan"] == "auto" and record["settings"]["precision"] == "auto"
    assert record["environment"]["scan"] == "pytorch" and record["environment"]["precision"] == "fp32"
    assert record["environment"]["packages"]["torch"] == metadata.version("torch")
    assert len(record["environment"]["git_commit"]) == 40 and record["environment"]["git_dirty"] in (True, False)
    assert record["wall_seconds_this_run"] > 0 and record["train_seconds_all_epochs"] > 0
    # The CPU and its instruction-set pins (the suite runs pinned: conftest imports pathmamba first).
    cpu = record["environment"]["cpu"]
    assert cpu["pinned_isa"] == "avx2" and cpu["capability"] == "AVX2" and "avx2" in cpu["isa_flags"]


def test_cosine_schedule_runs_from_the_configured_rate_down_to_zero():
    assert lr_factor("constant", 7, 10) == 1.0
    factors = [lr_factor("cosine", step, 10) for step in range(10)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.5) and 0 < factors[-1] < 0.03
    assert all(later < earlier for earlier, later in itertools.pairwise(factors))
    with pytest.raises(ValueError, match=r"lr_schedule='linear': expected one of constant, cosine"):
        TrainSettings(lr_schedule="linear")
    with pytest.raises(ValueError, match=r"selection='first': expected one of best, last"):
        TrainSettings(selection="first")


def test_last_selection_keeps_the_last_epoch_and_the_schedule_is_applied_per_step(data_root, tmp_path):
    settings = replace(SETTINGS, lr_schedule="cosine", selection="last")
    train("cam", "synthetic-luad", data_root, tmp_path / "run", tmp_path / "checkpoints", 0, TINY_CAM, settings)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["best_epoch"] == SETTINGS.epochs
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["epoch"] == SETTINGS.epochs
    with open(tmp_path / "run" / "history.csv") as handle:
        last_step_factors = [float(row["lr_factor"]) for row in csv.DictReader(handle)]
    steps = 2  # 16 training images, batch 8
    assert last_step_factors == [lr_factor("cosine", epoch * steps - 1, SETTINGS.epochs * steps)
                                 for epoch in range(1, SETTINGS.epochs + 1)]


@pytest.mark.parametrize("method, hparams", [
    ("cam", TINY_CAM),
    ("pathmamba", {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "d_state": 4, "decoder_dim": 16,
                   "backbone": "resnet18", "backbone_width": 8}),
])
def test_channels_last_gives_the_same_loss_and_scores(method, hparams):
    """The CUDA path's NHWC layout must not change the maths (checked here on the CPU)."""
    torch.manual_seed(0)
    model = build_method(method, num_classes=4, **hparams).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])
    results = []
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            model = model.to(memory_format=layout)
            batch = images.contiguous(memory_format=layout)
            results.append((model.loss(batch, targets)[0], model.predict(batch)))
    (loss_a, scores_a), (loss_b, scores_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores_a, scores_b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> Path:
    """A ResNet-18 state dict standing in for torchvision's file (no network here)."""
    path = tmp_path_factory.mktemp("served") / "resnet18-weights.pth"
    torch.manual_seed(1)
    torch.save(build_resnet("resnet18").state_dict(), path)
    return path


@pytest.fixture
def loopback_url(fake_weights):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fake_weights.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{fake_weights.name}"
    server.shutdown()
    thread.join()


def test_fetched_weights_load_into_the_backbone(fake_weights, loopback_url, tmp_path):
    digest = hashlib.sha256(fake_weights.read_bytes()).hexdigest()
    for url in (loopback_url, fake_weights.as_uri()):
        out = tmp_path / "weights" / "resnet18-imagenet.pth"
        download_file(url, out, check=lambda path: None if file_sha256(path) == digest else "another file")
        assert out.read_bytes() == fake_weights.read_bytes()
        model = build_resnet("resnet18", pretrained=str(out))
        expected = torch.load(fake_weights, weights_only=True)
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), name
        out.unlink()


def test_fetch_weights_rejects_a_file_that_is_not_torchvisions(loopback_url, tmp_path, capsys):
    out = tmp_path / "resnet18-imagenet.pth"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fetch-weights", "--backbone", "resnet18", "--out", str(out), "--url", loopback_url])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{loopback_url}: the server sent another file than the one asked for (SHA-256 " in err
    assert "does not start with f37072fd" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_file_is_an_error_not_a_random_init(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretrained weights file .*missing\.pth does not exist"):
        build_resnet("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_unreachable_weights_url_is_a_clear_error(tmp_path):
    url = (tmp_path / "nowhere.pth").as_uri()
    with pytest.raises(DownloadFailed, match=f"cannot download {url} to .*resnet50-imagenet.pth: .*No such file"):
        download_file(url, tmp_path / "resnet50-imagenet.pth")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    import os

    from pathmamba.core.files import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "table.md", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("backbone", sorted(RESNETS))
def test_stage_channels_match_every_backbone(backbone):
    stages = resnet_stages(build_resnet(backbone, width=8))
    images = torch.randn(1, 3, 64, 64)
    channels = []
    for stage in stages:
        images = stage(images)
        channels.append(images.shape[1])
    assert channels == stage_channels(backbone, width=8)
