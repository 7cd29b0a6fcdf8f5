"""GPU planning: job counts and GPU-hours of a config's grid (pathmamba/plan.py, `pathmamba plan`)."""

import pytest
import yaml
from conftest import REPO

from pathmamba.cli import main
from pathmamba.config import ConfigError
from pathmamba.plan import JOB_OVERHEAD_HOURS, evaluate_gpu_hours, gpu_jobs, runtime_minutes, train_gpu_hours

CONFIG = {
    "run": "plan",
    "seeds": [0, 1, 2],
    "datasets": {
        "synthetic-luad": {"synthetic": {"n_train": 100, "n_val": 20, "n_test": 50, "size": 32, "seed": 0}},
        "luad-histoseg": {"root": "unused/by/the/plan"},
    },
    "train": {"epochs": 3},
    "methods": {"cam": {}, "pathmamba": {"train": {"epochs": 6}}},
    "throughput": {
        "default": {"train_images_per_s": 10, "eval_images_per_s": 20},
        "pathmamba": {"train_images_per_s": 5},
    },
}


def test_hours_follow_image_counts_epochs_and_throughput():
    # 3 epochs x (100 images / 10 per s + 20 val images / 20 per s) = 33 s
    assert train_gpu_hours(CONFIG, "synthetic-luad", "cam") == pytest.approx(33 / 3600 + JOB_OVERHEAD_HOURS)
    # the method's own epochs and train throughput, the default eval throughput: 6 x (100/5 + 20/20)
    assert train_gpu_hours(CONFIG, "synthetic-luad", "pathmamba") == pytest.approx(126 / 3600 + JOB_OVERHEAD_HOURS)
    # a real dataset's published counts: 16,678 train, 300 val, 307 test images
    assert train_gpu_hours(CONFIG, "luad-histoseg", "cam") == pytest.approx(
        3 * (16678 / 10 + 300 / 20) / 3600 + JOB_OVERHEAD_HOURS)
    assert evaluate_gpu_hours(CONFIG, "luad-histoseg", "cam") == pytest.approx(307 / 20 / 3600 + JOB_OVERHEAD_HOURS)


def test_grid_has_a_train_and_an_evaluate_job_per_dataset_method_seed():
    jobs = gpu_jobs(CONFIG)
    assert len(jobs) == 2 * 2 * 3 * 2
    assert {(job.rule, job.dataset, job.method, job.seed) for job in jobs} == {
        (rule, dataset, method, seed) for rule in ("train", "evaluate") for dataset in CONFIG["datasets"]
        for method in CONFIG["methods"] for seed in CONFIG["seeds"]}


def test_runtime_limit_has_a_margin_and_grows_with_attempts():
    assert runtime_minutes(1.0, attempt=1) == 90
    assert runtime_minutes(1.0, attempt=3) == 270


def test_missing_throughput_names_the_key():
    config = {**CONFIG, "throughput": {"pathmamba": {"train_images_per_s": 5}}}
    with pytest.raises(ConfigError, match=r"throughput\.cam: missing train_images_per_s, eval_images_per_s"):
        gpu_jobs(config)


def test_cli_prints_the_plan_of_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert main(["plan", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    total = sum(job.gpu_hours for job in gpu_jobs(CONFIG))
    assert f"24 GPU jobs (12 train, 12 evaluate), {total:.1f} GPU-hours estimated" in out
    assert "| luad-histoseg | pathmamba | 6 |" in out


def test_cli_fills_schema_defaults_and_rejects_bad_values(tmp_path, capsys):
    # Without a throughput block the schema's default applies, as in the workflow.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in CONFIG.items() if key != "throughput"}))
    assert main(["plan", "--configfile", str(path)]) == 0
    assert "24 GPU jobs" in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**CONFIG, "throughput": {"cam": {"train_images_per_s": 0}}}))
    with pytest.raises(SystemExit, match="train_images_per_s"):
        main(["plan", "--configfile", str(path)])


def test_two_stage_method_plans_its_first_stage_and_pseudo_masks_too():
    config = {**CONFIG, "methods": {"wsss-tissue": {"stage1": {"train": {"epochs": 2}}, "train": {"epochs": 4}}}}
    jobs = [job for job in gpu_jobs(config) if job.dataset == "synthetic-luad" and job.seed == 0]
    hours = {job.rule: job.gpu_hours for job in jobs}
    assert list(hours) == ["train_stage1", "pseudo_masks", "train", "evaluate"]
    # each stage its own epochs: 2 x (100/10 + 20/20) and 4 x (100/10 + 20/20) s; masks of 100 images at 20/s
    assert hours["train_stage1"] == pytest.approx(22 / 3600 + JOB_OVERHEAD_HOURS)
    assert hours["train"] == pytest.approx(44 / 3600 + JOB_OVERHEAD_HOURS)
    assert hours["pseudo_masks"] == pytest.approx(5 / 3600 + JOB_OVERHEAD_HOURS)


def test_paper_config_plans_every_configured_job():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jobs = gpu_jobs(config)
    # train and evaluate per (dataset, method, seed); wsss-tissue's first stage and pseudo masks besides
    assert len(jobs) == (2 * len(config["methods"]) + 2) * len(config["datasets"]) * len(config["seeds"])
    assert all(job.gpu_hours > JOB_OVERHEAD_HOURS for job in jobs)
