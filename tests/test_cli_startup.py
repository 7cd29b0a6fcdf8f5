"""Commands start fast and stand alone: building the command line imports neither torch nor the
libraries of the commands not run, and ``plan``, ``doctor`` and ``calibrate`` run where snakemake is not
installed (a rule's conda environment, docs/environment.md)."""

import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

#: Libraries that take seconds to import; the parser and ``plan`` need none of them.
HEAVY = {"torch", "pandas", "scipy", "matplotlib", "snakemake"}


def imported_modules(*args: str) -> set[str]:
    """The modules that ``python -m pathmamba <args>`` imported, from ``-X importtime``'s report."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pathmamba", *args], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"], ["tables", "--help"], ["doctor", "--help"],
                                  ["plan", "--configfile", "config/config.yaml"]])
def test_the_parser_and_plan_import_nothing_heavy(args):
    modules = imported_modules(*args)
    assert "pathmamba.cli" in modules  # the report is read right
    assert not sorted(HEAVY & modules)


def run_without_snakemake(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``python <args>`` where ``import snakemake`` fails as it does without snakemake: a package of that
    name first on the path raises the ModuleNotFoundError of a missing one."""
    blocker = tmp_path / "without-snakemake" / "snakemake"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'snakemake'\", name='snakemake')\n")
    environment = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          check=False)


def test_the_blocker_makes_snakemake_unimportable(tmp_path):
    result = run_without_snakemake(tmp_path, "-c", "import snakemake.utils")
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'snakemake'" in result.stderr


def one_method_config(tmp_path) -> str:
    """The demo config reduced to one method and one dataset, written under ``tmp_path``."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["grid"] = {"methods": ["cam"], "datasets": ["synthetic-luad"]}
    config["results_dir"] = str(tmp_path / "results")
    config["resources_dir"] = str(tmp_path / "resources")
    path = tmp_path / "one method.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_plan_runs_without_snakemake(tmp_path):
    result = run_without_snakemake(tmp_path, "-m", "pathmamba", "plan", "--configfile", "config/config.yaml")
    assert result.returncode == 0, result.stderr
    assert "GPU-hours" in result.stdout


def test_doctor_runs_without_snakemake(tmp_path):
    result = run_without_snakemake(tmp_path, "-m", "pathmamba", "doctor", "--configfile", one_method_config(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert "| config | OK |" in result.stdout
    assert "| free disk | OK |" in result.stdout  # sized by building the model


def test_calibrate_runs_without_snakemake(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_without_snakemake(tmp_path, "-m", "pathmamba", "calibrate", "--configfile", one_method_config(tmp_path),
                                   "--device", "cpu", "--methods", "cam", "--steps", "1", "--warmup-steps", "0",
                                   "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "cam" in yaml.safe_load(out.read_text())["methods"]


def test_a_value_the_schema_refuses_is_named_without_snakemake(tmp_path):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["train"]["epochs"] = 0
    config["report"] = {"n_images": "four"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_without_snakemake(tmp_path, "-m", "pathmamba", "plan", "--configfile", str(path))
    assert result.returncode == 2
    assert "train.epochs: 0 is less than the minimum of 1" in result.stderr
    assert "report.n_images: 'four' is not of type 'integer'" in result.stderr
    assert "Traceback" not in result.stderr
