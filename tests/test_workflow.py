"""The Snakemake workflow: start-up validation of bad configs, and one end-to-end run on tiny data."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from PIL import Image

TINY = {
    "experiment": "tiny",
    "seeds": [0, 1],
    "datasets": {
        "synthetic-luad": {"synthetic": {"n_train": 24, "n_val": 6, "n_test": 6, "size": 64, "seed": 0}},
        "synthetic-bcss": {"synthetic": {"n_train": 24, "n_val": 6, "n_test": 6, "size": 64, "seed": 1}},
    },
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
    "evaluate": {"n_masks": 2},
    "methods": {"cam": {"hparams": {"backbone": "resnet18"}}},
}


def snakemake_command(snakemake_bin, workdir: Path, config: dict, *extra: str) -> list[str]:
    """The snakemake command line for ``config`` (written to ``workdir``/config.yaml) in ``workdir``."""
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return [snakemake_bin, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config_path), "--cores", "2", *extra]


def run_snakemake(snakemake_bin, env, workdir: Path, config: dict, *extra: str):
    return subprocess.run(snakemake_command(snakemake_bin, workdir, config, *extra), capture_output=True,
                          text=True, env=env, timeout=900, check=False)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c["methods"].update({"no-such-method": {}}),
         ["methods.no-such-method: unknown method", "registered methods: ", "pathmamba-b-miml"]),
        (lambda c: c.update(seeds=[0, -1]), ["-1 is less than the minimum of 0", "seeds"]),
        (lambda c: c["datasets"].update({"luad-histoseg": {"root": "/no/such/folder"}}),
         ["datasets.luad-histoseg.root: '/no/such/folder' is not a directory"]),
        (lambda c: c["train"].update(device="gpu"), ["'gpu' does not match", "device"]),
        (lambda c: c.update(weights_urls={"resnet18": ""}), ["'' does not match", "weights_urls"]),
    ],
    ids=["unknown-method", "negative-seed", "missing-dataset-path", "bad-device", "weights-url-not-a-url"],
)
def test_bad_config_fails_at_start_up(tmp_path, snakemake_bin, workflow_env, change, expected):
    config = json.loads(json.dumps(TINY))
    change(config)
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, "--dry-run")
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.e2e
def test_pipeline_end_to_end_on_tiny_synthetic_data(tmp_path, snakemake_bin, workflow_env):
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / "results" / "tiny"

    with open(results / "tables" / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    cells = {(row["dataset"], row["method"]): row for row in rows}
    assert set(cells) == {(d, m) for d in TINY["datasets"] for m in ("cam", "trivial")}
    for (_, method), row in cells.items():
        assert int(row["n_seeds"]) == (2 if method == "cam" else 1)
        for metric in ("mDice", "mIoU", "mPrecision", "mRecall"):
            assert 0.0 <= float(row[f"{metric}_mean"]) <= 1.0
    assert "± " in (results / "tables" / "comparison.md").read_text()
    with open(results / "tables" / "table1_comparison.csv") as handle:
        table1 = {(row["dataset"], row["method"], row["metric"]): row for row in csv.DictReader(handle)}
    for (dataset, method), row in cells.items():
        assert float(table1[(dataset, method, "mIoU")]["mean"]) == pytest.approx(float(row["mIoU_mean"]), abs=1e-6)
        assert table1[(dataset, method, "mIoU")]["status"] == "complete"
    for name in ("qualitative_synthetic-luad", "heatmaps_synthetic-luad", "confusion_synthetic-luad", "miou_over_seeds",
                 "ablation", "per_class_iou", "training_curves", "compute_cost"):
        for extension in ("png", "pdf"):
            assert (results / "figures" / f"{name}.{extension}").stat().st_size > 1000

    for dataset in TINY["datasets"]:
        for seed in (0, 1):
            run = results / "runs" / dataset / "cam" / f"seed{seed}"
            metrics = json.loads((run / "test_metrics.json").read_text())
            assert set(metrics["protocols"]) == {"ignore_background", "with_background"}
            assert len(metrics["protocols"]["with_background"]["confusion"]) == 5
            with open(run / "history.csv") as handle:
                assert len(list(csv.DictReader(handle))) == 2
            masks = sorted((run / "masks").glob("*.png"))
            assert len(masks) == 2
            mask = Image.open(masks[0])
            assert mask.mode == "P" and set(np.unique(np.asarray(mask))) <= {0, 1, 2, 3, 4}
            assert (results / "benchmarks" / dataset / "cam" / f"seed{seed}" / "train.tsv").exists()
        # Different seeds train different models.
        seed0 = json.loads((results / "runs" / dataset / "cam" / "seed0" / "test_metrics.json").read_text())
        seed1 = json.loads((results / "runs" / dataset / "cam" / "seed1" / "test_metrics.json").read_text())
        assert seed0["protocols"] != seed1["protocols"]

    again = run_snakemake(snakemake_bin, workflow_env, tmp_path, TINY, "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
