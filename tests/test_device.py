"""No silent fallbacks: device and precision settings, the environment record, and `doctor` on this CPU machine."""

import logging
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO

from pathmamba.core.devices import resolve_device, resolve_precision
from pathmamba.core.environment import describe_environment, environment_record

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")


def test_cuda_without_a_gpu_is_an_error_naming_the_setting():
    with pytest.raises(RuntimeError, match=r"device 'cuda' requested \(train.device .*set train.device to 'cpu'"):
        resolve_device("cuda")


def test_auto_without_a_gpu_runs_on_the_cpu_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="pathmamba.core.devices"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "device 'auto' runs on the CPU: " in caplog.text
    assert torch.__version__ in caplog.text


@pytest.mark.parametrize("name, expected", [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_precision_on_the_cpu(name, expected):
    assert resolve_precision(name, torch.device("cpu")) == expected


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp16' is invalid; allowed: auto, bf16, fp32"):
        resolve_precision("fp16", torch.device("cpu"))


def test_environment_record_names_what_ran():
    record = environment_record(torch.device("cpu"), "pytorch", "fp32")
    assert record["scan"] == "pytorch" and record["precision"] == "fp32"
    assert record["cuda"] == torch.version.cuda and record["cuda_driver"] is None and record["gpu_slot"] is None
    line = describe_environment(record)
    assert line.startswith("device cpu (") and "| scan pytorch | precision fp32 |" in line


def test_train_with_cuda_on_a_cpu_machine_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pathmamba", "train", "--method", "cam", "--dataset", "synthetic-luad",
         "--data-root", str(tmp_path / "no-data"), "--out", str(tmp_path / "out"),
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--settings", '{"device": "cuda"}'],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert result.returncode != 0
    # The device is checked before the (missing) dataset is read: the error is about CUDA.
    assert "device 'cuda' requested" in result.stderr and "no-data" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def run_doctor(configfile) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pathmamba", "doctor", "--configfile", str(configfile)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False)


def doctor_rows(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("OK", "FAIL", "n/a"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_doctor_passes_the_demo_config_with_the_gpu_rows_not_applicable():
    result = run_doctor(REPO / "config" / "demo.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = doctor_rows(result.stdout)
    assert rows["CUDA device"][0] == "n/a" and rows["fused selective scan"][0] == "n/a"
    assert rows["Python"][0] == "OK" and rows["torch"][0] == "OK" and rows["free disk"][0] == "OK"
    assert rows["dataset synthetic-luad"][0] in ("OK", "n/a")


def test_doctor_fails_the_paper_config_on_a_machine_without_cuda(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(results_dir=str(tmp_path / "results"), resources_dir=str(tmp_path / "resources"))
    for entry in config["methods"].values():
        for block in (entry, entry.get("stage1", {})):
            for key, value in block.get("hparams", {}).items():
                if isinstance(value, str) and value.startswith("resources/"):
                    block["hparams"][key] = str(tmp_path / value)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_doctor(configfile)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = doctor_rows(result.stdout)
    assert rows["CUDA device"][0] == "FAIL" and "set train.device to 'cpu'" in rows["CUDA device"][1]
    assert rows["pretrained weights"][0] == "FAIL" and "resnet50-imagenet.pth" in rows["pretrained weights"][1]
    assert rows["dataset luad-histoseg"][0] == "FAIL" and "validate_dataset" in rows["dataset luad-histoseg"][1]
    # Ten PathMamba runs of 52 M float32 parameters alone write 2 GB of model files.
    written = re.search(r"the grid writes up to ([0-9.]+) GiB", rows["free disk"][1])
    assert written and float(written.group(1)) > 2


def test_doctor_asks_for_the_python_that_pyproject_requires():
    import tomllib

    from pathmamba.operations.doctor import MINIMUM_PYTHON

    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=" + ".".join(map(str, MINIMUM_PYTHON))
