"""Measured throughput (pathmamba/operations/calibrate.py, `pathmamba calibrate`) and the plan that reads it."""

import contextlib
import io
import json
import math
import re

import pytest
import yaml
from conftest import REPO, cli_error

from pathmamba.cli import main
from pathmamba.engine.config import ConfigError
from pathmamba.engine.train import split_for_pixel_supervision
from pathmamba.operations.calibrate import calibration_hparams
from pathmamba.operations.plan import training_images

# One of each supervision: image labels, val masks, and a first stage with its pseudo masks.
METHODS = ["cam", "unet", "wsss-tissue"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The demo config with its resources in a temporary folder, calibrated for METHODS with one timed
    step each into the default file: (config path, throughput file, the printed table)."""
    folder = tmp_path_factory.mktemp("calibrate")
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["resources_dir"] = str(folder / "resources")
    config_path = folder / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["calibrate", "--configfile", str(config_path), "--methods", *METHODS, "--steps", "1",
                     "--warmup-steps", "0"]) == 0
    return config_path, folder / "resources" / "throughput-cpu.json", printed.getvalue()


def test_calibrate_writes_positive_finite_numbers_labelled_cpu(calibrated):
    _, path, table = calibrated
    record = json.loads(path.read_text())
    assert record["device_type"] == "cpu" and record["device_name"]
    assert record["settings"]["image_size"] == 64 and record["settings"]["steps"] == 1
    assert list(record["methods"]) == METHODS
    entries = [*record["methods"].values(), record["methods"]["wsss-tissue"]["stage1"]]
    for entry in entries:
        for key in ("train_images_per_s", "eval_images_per_s", "peak_memory_mb"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (key, entry)
    assert record["methods"]["wsss-tissue"]["stage1"]["pseudo_masks_images_per_s"] > 0
    # the config's settings: unet's own batch size and hyper-parameters
    assert record["methods"]["unet"]["batch_size"] == 4
    assert record["methods"]["unet"]["hparams"]["encoder"] == "tu-resnet18"
    assert "| wsss-tissue (stage 1) | 16 |" in table


def test_plan_uses_the_measured_file_and_falls_back_for_other_methods(calibrated, capsys):
    config_path, _, _ = calibrated
    assert main(["plan", "--configfile", str(config_path)]) == 0
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| synthetic-luad |")}
    for method in METHODS:
        assert " | measured (" in rows[method], rows[method]
    assert rows["pathmamba"].endswith("| assumed (config; not measured) |")


def test_missing_weights_file_is_an_error_before_any_measurement(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no resources/weights/ here
    config_path = REPO / "config" / "config.yaml"
    expected = (r"methods\.cam\.hparams\.pretrained: weights file 'resources/weights/resnet50-imagenet\.pth' "
                r"does not exist.*--random-init")
    assert re.search(expected, cli_error(["calibrate", "--configfile", str(config_path), "--device", "cpu"], capsys))
    config = yaml.safe_load(config_path.read_text())
    second_stage = calibration_hparams(config, "wsss-tissue", None, random_init=True)
    assert second_stage["segmenter_pretrained"] == "none"
    assert calibration_hparams(config, "wsss-tissue", 1, random_init=True)["pretrained"] == "none"
    with pytest.raises(ConfigError, match=r"methods\.wsss-tissue\.stage1\.hparams\.pretrained"):
        calibration_hparams(config, "wsss-tissue", 1, random_init=False)


def test_an_unknown_or_unconfigured_method_is_an_error_naming_it(tmp_path, capsys):
    message = cli_error(["calibrate", "--configfile", str(REPO / "config" / "demo.yaml"), "--methods", "sam"], capsys)
    assert "argument --methods: unknown method 'sam'; registered methods: c-cam, cam" in message  # by the parser
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    del config["methods"]["unet"]
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    message = cli_error(["calibrate", "--configfile", str(configfile), "--methods", "unet"], capsys)
    assert f"{configfile}: methods: unet not configured; configured methods: c-cam, cam, gradcam" in message


@pytest.mark.parametrize(("n_val", "val_fraction"), [(24, 0.2), (300, 0.2), (7, 0.5), (2, 0.1)])
def test_plan_counts_the_val_images_a_pixel_supervised_method_trains_on(n_val, val_fraction):
    config = {"datasets": {"synthetic-luad": {"synthetic": {"n_train": 100, "n_val": n_val, "n_test": 5,
                                                            "size": 32, "seed": 0}}},
              "train": {"val_fraction": val_fraction}, "methods": {"unet": {}}}
    fit, select = split_for_pixel_supervision(n_val, val_fraction)
    assert training_images(config, "synthetic-luad", "unet") == (len(fit), len(select))


def test_a_scan_this_device_cannot_run_is_an_error_before_any_measurement(tmp_path, capsys):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["train"]["scan"] = "fused"  # CUDA only; the demo trains on the CPU
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    message = cli_error(["calibrate", "--configfile", str(config_path), "--out", str(tmp_path / "out.json")], capsys)
    assert re.search(r"methods\.[a-z-]+: scan 'fused' on device 'cpu'.*--scan / --precision", message)
    assert not (tmp_path / "out.json").exists()
