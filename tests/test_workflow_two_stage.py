"""A two-stage method (wsss-tissue) through the workflow: stage 1, its pseudo masks and stage 2 are three
jobs, so a change to the second stage's settings reruns only what depends on it."""

import json
import re

import pytest
from test_workflow import run_snakemake

TWO_STAGE = {
    "experiment": "two-stage",
    "seeds": [0],
    "threads_per_job": 1,
    "datasets": {"synthetic-luad": {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}}},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu", "workers": 0},
    "evaluate": {"n_masks": 1},
    "methods": {"wsss-tissue": {
        "stage1": {"hparams": {"backbone": "resnet18", "width": 8, "pretrained": "none"}, "train": {"epochs": 2}},
        "hparams": {"segmenter_encoder": "tu-lcnet_050", "decoder_channels": 8},
    }},
}
TARGET = "results/two-stage/tables/comparison.csv"


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table of a dry run."""
    table = output[output.index("Job stats:"):]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)
            if rule != "total"}


@pytest.mark.e2e
def test_stages_are_jobs_of_their_own_and_a_stage2_change_keeps_stage1(tmp_path, snakemake_bin, workflow_env):
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, TWO_STAGE, TARGET)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "results" / "two-stage" / "runs" / "synthetic-luad" / "wsss-tissue" / "seed0"
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["images"] == 16 and manifest["masks"] == ["layer4", "layer3", "layer2"]
    assert len(list((run / "pseudo_masks" / "layer4").glob("*.png"))) == 16
    assert (run / "stage1" / "model.pt").exists() and (run / "test_metrics.json").exists()
    assert "wsss-tissue" in (tmp_path / TARGET).read_text()

    stage2_change = json.loads(json.dumps(TWO_STAGE))
    stage2_change["methods"]["wsss-tissue"]["hparams"]["gate_threshold"] = 0.2
    dry_run = run_snakemake(snakemake_bin, workflow_env, tmp_path, stage2_change, TARGET, "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr[-4000:]
    assert planned_jobs(dry_run.stdout) == {"train": 1, "evaluate": 1, "tables": 1}

    stage1_change = json.loads(json.dumps(TWO_STAGE))
    stage1_change["methods"]["wsss-tissue"]["stage1"]["train"]["epochs"] = 3
    dry_run = run_snakemake(snakemake_bin, workflow_env, tmp_path, stage1_change, TARGET, "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr[-4000:]
    assert planned_jobs(dry_run.stdout) == {"train_stage1": 1, "pseudo_masks": 1, "train": 1, "evaluate": 1,
                                            "tables": 1}


def test_a_stage1_block_on_a_one_stage_method_fails_at_start_up(tmp_path, snakemake_bin, workflow_env):
    config = {**TWO_STAGE, "methods": {"cam": {"stage1": {"hparams": {}}}}}
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, TARGET, "--dry-run")
    assert result.returncode != 0
    assert "methods.cam.stage1: cam has no first stage; methods with one: wsss-tissue" in result.stdout + result.stderr
