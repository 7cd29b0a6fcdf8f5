"""The rehearsal's machinery (pathmamba/operations/rehearsal.py): the overlay on the real paper config, the folder's
safety, archives through the real prepare-dataset and validate-dataset, weights files through the real
loading code, and the checks after a run flagging a doctored run.json and a job over its memory request.
The rehearsal itself (`make rehearse`) runs in CI after the test suite."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from pathmamba.engine.config import method_hparams, train_settings
from pathmamba.engine.registry import get_spec, two_stage_methods
from pathmamba.operations.rehearsal import (
    MARKER,
    OVERLAY,
    PAPER_CONFIG,
    RehearsalError,
    apply_overlay,
    changed_keys,
    check_effective_config,
    check_runs,
    check_weights_loaded,
    claim_folder,
    cost_table,
    job_costs,
    load_yaml,
    memory_requests,
    weights_files,
    write_archive,
    write_random_weights,
)

PAPER = load_yaml(PAPER_CONFIG)
REHEARSAL = load_yaml(OVERLAY)


def _stages(method):
    return [None, 1] if method in two_stage_methods() else [None]


def test_overlay_keeps_every_hyper_parameter_of_the_paper_config():
    effective = apply_overlay(PAPER, REHEARSAL["config"])
    check_effective_config(effective, REHEARSAL["archives"])

    assert list(effective["methods"]) == list(PAPER["methods"])
    assert list(effective["datasets"]) == list(PAPER["datasets"])
    for method in PAPER["methods"]:
        for stage in _stages(method):
            # Only a method's own schedule's epoch counts may differ (SC-CAM's CAM phase and rounds).
            schedule = set(get_spec(method, stage).epochs_from)
            effective_hparams, paper_hparams = method_hparams(effective, method, stage), method_hparams(PAPER, method, stage)
            assert {key for key in effective_hparams.keys() | paper_hparams.keys()
                    if effective_hparams.get(key) != paper_hparams.get(key)} <= schedule, (method, stage)
            changed = {key for key, value in train_settings(effective, method, stage).items()
                       if train_settings(PAPER, method, stage).get(key) != value}
            assert changed <= {"epochs", "batch_size", "device", "scan", "precision"}, (method, stage)
            assert train_settings(effective, method, stage)["lr"] == train_settings(PAPER, method, stage)["lr"]
    # A dataset entry is replaced whole: the download source is gone, not beside the archive.
    for entry in effective["datasets"].values():
        assert "source" not in entry and entry["archive"].endswith(".zip")
    assert effective["train"] == {**PAPER["train"], "epochs": 1, "batch_size": effective["train"]["batch_size"],
                                  "device": "cpu", "scan": "pytorch", "precision": "fp32"}
    assert load_yaml(PAPER_CONFIG) == PAPER  # the paper config itself is untouched
    # SC-CAM's rounds are shrunk, not dropped: the rehearsal clusters and restarts as the paper run does.
    assert method_hparams(effective, "sc-cam")["round_epochs"] == [1, 1, 1]
    assert train_settings(effective, "sc-cam")["epochs"] == 4


@pytest.mark.parametrize("overlay, message", [
    ({"methods": {"cam": {"hparams": {"backbone": "resnet18"}}}}, "methods.cam.hparams.backbone"),
    ({"methods": {"pathmamba": {"hparams": {"dims": [16, 32, 64, 128]}}}}, "methods.pathmamba.hparams.dims"),
    ({"train": {"lr": 1.0e-3}}, "train.lr"),
    ({"evaluate": {"tta": True}}, "evaluate.tta"),
    ({"methods": {"no-such": {}}}, "no-such not in the paper config"),
    ({"datasets": {"synthetic-luad": {"root": "x"}}}, "synthetic-luad not in the paper config"),
])
def test_overlay_refuses_anything_but_data_counts_and_machine(overlay, message):
    with pytest.raises(RehearsalError, match=message):
        apply_overlay(PAPER, overlay)


def test_effective_config_must_stay_inside_the_folder_and_download_nothing():
    effective = apply_overlay(PAPER, REHEARSAL["config"])
    escaping = {**effective, "resources_dir": "/shared/resources"}
    with pytest.raises(RehearsalError, match="resources_dir: '/shared/resources'"):
        check_effective_config(escaping, REHEARSAL["archives"])
    downloading = apply_overlay(PAPER, {**REHEARSAL["config"], "datasets": {}})
    with pytest.raises(RehearsalError, match=re.escape("datasets.luad-histoseg: {'source': 'gdrive'}")):
        check_effective_config(downloading, REHEARSAL["archives"])


def test_folder_is_created_marked_and_never_one_it_did_not_create(tmp_path):
    folder = claim_folder(tmp_path / "a rehearsal")
    assert (folder / MARKER).is_file()
    assert claim_folder(folder) == folder  # its own folder: reused (a rerun resumes)
    (tmp_path / "results").mkdir()
    with pytest.raises(RehearsalError, match="was not created by a rehearsal"):
        claim_folder(tmp_path / "results")
    assert list((tmp_path / "results").iterdir()) == []


def _cli(*args: str) -> int:
    """A ``python -m pathmamba`` command, run in this process."""
    from pathmamba.cli import main

    return main(list(args))


@pytest.mark.parametrize("dataset, unpaired", [("luad-histoseg", True), ("bcss-wsss", False)])
def test_archives_pass_the_real_prepare_and_validate_commands(tmp_path, capsys, dataset, unpaired):
    archive = tmp_path / "archives" / "Published Name.zip"
    archive.parent.mkdir()
    write_archive(archive, dataset, n_train=4, n_val=3, n_test=3, seed=0, rgb_masks=1,
                  unpaired_test_image=unpaired)
    out = tmp_path / "datasets" / dataset
    assert _cli("prepare-dataset", "--dataset", dataset, "--out", str(out), "--lock", str(tmp_path / "lock.json"),
                "--archive", str(archive)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"training": 4, "val": 3, "test": 3}
    notes = "\n".join(manifest["tolerated"])
    assert "nested top folder: the splits are in Published Name/Published Name/" in notes
    assert "val: 1 of 3 masks are RGB" in notes
    assert ("-unpaired.png has no mask" in notes) == unpaired

    report = tmp_path / "validation.json"
    assert _cli("validate-dataset", "--dataset", dataset, "--data-root", str(out), "--out", str(report),
                "--counts", "warn") == 0
    summary = capsys.readouterr().err
    assert "images 224x224 px" in summary and "training: 4 usable files" in summary
    assert json.loads(report.read_text())["ok"]


def test_weights_files_have_torchvision_keys_and_load_with_the_real_code(tmp_path, caplog):
    import segmentation_models_pytorch as smp

    from baselines.segmenters import smp_network
    from pathmamba.models.backbones import build_resnet

    effective = apply_overlay(PAPER, REHEARSAL["config"])
    files = weights_files(effective)
    assert files == {"resources/weights/resnet50-imagenet.pth": "resnet50",
                     "resources/weights/resnet101-imagenet.pth": "resnet101"}
    for path, backbone in files.items():
        write_random_weights(tmp_path / path, backbone)
    saved = torch.load(tmp_path / "resources/weights/resnet50-imagenet.pth", weights_only=True)
    with caplog.at_level("INFO"):
        resnet = build_resnet("resnet50", str(tmp_path / "resources/weights/resnet50-imagenet.pth"))
        segmenter = smp_network(smp.DeepLabV3Plus, "resnet101",
                                str(tmp_path / "resources/weights/resnet101-imagenet.pth"), "wsss-tissue")
    loaded = resnet.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    saved = torch.load(tmp_path / "resources/weights/resnet101-imagenet.pth", weights_only=True)
    encoder = segmenter.encoder.state_dict()
    assert all(torch.equal(encoder[k], saved[k]) for k in encoder)
    assert "resnet50: loaded weights from " in caplog.text and "loaded resnet101 encoder weights from" in caplog.text


# A paper config small enough to train for real in seconds; the overlay changes its counts only.
TINY_PAPER = {
    "experiment": "paper", "results_dir": "results", "resources_dir": "resources", "seeds": [0, 1],
    "datasets": {"luad-histoseg": {"source": "gdrive"}},
    "train": {"epochs": 3, "batch_size": 16, "lr": 1.0e-3, "device": "cpu"},
    "methods": {"cam": {"hparams": {"backbone": "resnet18", "pretrained": "resources/weights/resnet18-imagenet.pth",
                                    "output_stride": 8, "threshold": 0.4}}},
}
TINY_OVERLAY = {"experiment": "rehearsal", "seeds": [0], "datasets": {"luad-histoseg": {"archive": "data.zip",
                                                                                 "validate": {"image_size": 32}}},
                "train": {"epochs": 1, "batch_size": 4}}


def test_checks_flag_a_doctored_run_json_and_a_job_over_its_memory_request(tmp_path, monkeypatch, caplog):
    effective = apply_overlay(TINY_PAPER, TINY_OVERLAY)
    assert changed_keys(TINY_PAPER, effective) == [
        "experiment", "seeds", "datasets.luad-histoseg.source", "datasets.luad-histoseg.archive",
        "datasets.luad-histoseg.validate", "train.epochs", "train.batch_size"]
    folder = claim_folder(tmp_path / "a rehearsal")
    write_archive(folder / "data.zip", "luad-histoseg", n_train=4, n_val=2, n_test=2, seed=0, rgb_masks=0,
                  unpaired_test_image=False, size=32)
    write_random_weights(folder / "resources/weights/resnet18-imagenet.pth", "resnet18")
    data = folder / "resources/datasets/luad-histoseg"
    assert _cli("prepare-dataset", "--dataset", "luad-histoseg", "--out", str(data), "--lock",
                str(folder / "lock.json"), "--archive", str(folder / "data.zip")) == 0
    # The training job as the workflow's train rule runs it, in the folder: its run.json, its log.
    run = folder / "results/rehearsal/runs/luad-histoseg/cam/seed0"
    log = folder / "results/rehearsal/logs/luad-histoseg/cam/seed0/train.log"
    log.parent.mkdir(parents=True)
    monkeypatch.chdir(folder)
    to_log = logging.FileHandler(log)
    logging.getLogger().addHandler(to_log)
    try:
        with caplog.at_level(logging.INFO):
            assert _cli("train", "--method", "cam", "--dataset", "luad-histoseg", "--data-root",
                        "resources/datasets/luad-histoseg", "--seed", "0", "--out", str(run.relative_to(folder)),
                        "--checkpoint-dir", "checkpoints", "--hparams", json.dumps(method_hparams(effective, "cam")),
                        "--settings", json.dumps(train_settings(effective, "cam"))) == 0
    finally:
        logging.getLogger().removeHandler(to_log)
        to_log.close()
    assert check_runs(TINY_PAPER, effective, folder) == []
    assert check_weights_loaded(effective, folder) == []
    # Found by the rehearsal: evaluation rebuilt the model from the weights file, an undeclared input.
    (folder / "resources/weights/resnet18-imagenet.pth").unlink()
    assert _cli("evaluate", "--model", str(run / "model.pt"), "--data-root", str(data), "--out", str(run),
                "--device", "cpu") == 0

    record = json.loads((run / "run.json").read_text())
    record["hparams"]["threshold"] = 0.5
    record["settings"]["lr"] = 1.0e-4
    (run / "run.json").write_text(json.dumps(record))
    problems = check_runs(TINY_PAPER, effective, folder)
    assert len(problems) == 2
    assert "hparams" in problems[0] and "'threshold': 0.5" in problems[0] and "'threshold': 0.4" in problems[0]
    assert problems[1].endswith("settings.lr = 0.0001, expected 0.001")
    log.write_text("no weights here\n")
    assert check_weights_loaded(effective, folder) == [
        f"{log}: no line saying resources/weights/resnet18-imagenet.pth was loaded"]

    # Memory requests from a real dry run of the effective config; a benchmark over the train rule's.
    config_path = folder / "config.yaml"
    config_path.write_text(json.dumps(effective))
    requests = memory_requests(folder, config_path)
    benchmark = "results/rehearsal/benchmarks/luad-histoseg/cam/seed0/train.tsv"
    assert requests[benchmark] == ("train", 10000)
    assert requests["results/rehearsal/benchmarks/luad-histoseg/cam/seed0/evaluate.tsv"] == ("evaluate", 6000)
    (folder / benchmark).parent.mkdir(parents=True)
    (folder / benchmark).write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\t"
                                    "cpu_time\n12.5\t0:00:12\t12000.5\t1\t1\t1\t0\t0\t100\t12\n")
    [cost] = job_costs(effective, folder, requests)
    assert (cost.method, cost.job, cost.images, cost.mem_mb, cost.over) == ("cam", "train", 4, 10000, True)
    assert "| cam | luad-histoseg | train | 12.5 | 4 | 3.12 |" in cost_table([cost])
    assert "OVER the request" in cost_table([cost])


def test_pathmamba_variants_without_the_miml_branch_name_no_weights_file():
    # Found by the rehearsal: pathmamba-b and pathmamba-b-cmb named the ResNet-50 file and never loaded it.
    from pathmamba.engine.registry import build_method

    tiny = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "decoder_dim": 8}
    for method in ("pathmamba-b", "pathmamba-b-cmb"):
        build_method(method, 4, **tiny, **method_hparams(PAPER, method))
        with pytest.raises(ValueError, match=re.escape("pretrained='resources/weights/resnet50-imagenet.pth' is invalid")):
            build_method(method, 4, **tiny, pretrained="resources/weights/resnet50-imagenet.pth")
