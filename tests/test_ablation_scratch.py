"""config/ablation_scratch.yaml: the ablation grid merged over the paper config, every variant from scratch."""

import re
import subprocess

import pytest
import yaml
from conftest import REPO

from pathmamba.engine.config import ConfigError, check_config, grid_datasets, grid_methods

ABLATION_ROWS = ["pathmamba-b", "pathmamba-b-miml", "pathmamba-b-cmb", "pathmamba-b-miml-cmb", "pathmamba"]


def test_the_overlay_runs_paper_table2s_variants_on_luad_from_random_weights(snakemake_bin, workflow_env, tmp_path):
    result = subprocess.run(
        [snakemake_bin, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(REPO),
         "--configfile", "config/config.yaml", "config/ablation_scratch.yaml", "--dry-run", "--printshellcmds",
         "--cores", "1"], capture_output=True, text=True, env=workflow_env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    train_commands = [line for line in result.stdout.splitlines() if "-m pathmamba train" in line]
    jobs = sorted((re.search(r"--method (\S+)", line)[1], re.search(r"--seed (\d+)", line)[1])
                  for line in train_commands)
    assert jobs == sorted((method, str(seed)) for method in ABLATION_ROWS for seed in range(5))
    assert all("--dataset luad-histoseg" in line for line in train_commands)
    assert all('"pretrained": "none"' in line for line in train_commands if "miml" in line or "method pathmamba " in line)
    assert "resources/weights/" not in result.stdout and "fetch_weights" not in result.stdout
    assert "results/ablation-scratch/tables/table2_ablation.md" in result.stdout


def test_grid_selects_configured_names_and_refuses_others():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert grid_methods(config) == list(config["methods"]) and grid_datasets(config) == list(config["datasets"])
    config["grid"] = {"methods": ["pathmamba", "cam"], "datasets": ["bcss-wsss"]}
    assert grid_methods(config) == ["pathmamba", "cam"] and grid_datasets(config) == ["bcss-wsss"]
    config["grid"] = {"methods": ["pathmamba", "pathmambaa"], "datasets": ["bcss"]}
    with pytest.raises(ConfigError) as error:
        check_config(config)
    assert "grid.methods: 'pathmambaa' is not configured under methods:" in str(error.value)
    assert "grid.datasets: 'bcss' is not configured under datasets:" in str(error.value)
