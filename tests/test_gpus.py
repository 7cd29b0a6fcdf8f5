"""GPUs as a resource: the pool, crash-safe slots, and a workflow that never runs more GPU jobs than GPUs.

This machine has no GPU: the workflow test pretends two (`gpus: 2`) with `device: auto`, so every
training job is a GPU job that claims a slot and then, finding no CUDA, runs on the CPU.
"""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_workflow import TINY, run_snakemake

from pathmamba.core.gpus import claim_workflow_gpu, gpu_pool, threads_per_job, visible_gpus

# Claims a slot of the pool in argv[1] (locks in argv[2]), prints its id, holds it until stdin closes.
HOLDER = """
import sys
from pathlib import Path
from pathmamba.core.gpus import claim_gpu
slot = claim_gpu(sys.argv[1].split(","), Path(sys.argv[2]), retry_seconds=0.1)
print(slot.gpu, flush=True)
sys.stdin.read()
"""


def start_holder(pool: str, lock_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, pool, str(lock_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def printed_within(process: subprocess.Popen, seconds: float) -> str | None:
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    return process.stdout.readline().strip() if ready else None


@pytest.mark.parametrize("value, expected", [("1,3", ["1", "3"]), ("", []), ("-1", []), (" 2 ", ["2"])])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == expected


def test_pool_is_the_visible_gpus_or_the_configured_count(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert gpu_pool("auto") == ["5", "6", "7"]
    assert gpu_pool(2) == ["5", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_pool("auto") == []
    assert gpu_pool(2) == ["0", "1"]  # a pretend pool, as the workflow test below uses
    with pytest.raises(ValueError, match="gpus: -1 is invalid"):
        gpu_pool(-1)


@pytest.mark.parametrize("cores, gpus, expected", [(8, 4, 1), (16, 4, 3), (32, 4, 7), (17, 4, 4), (4, 8, 1),
                                                   (2, 0, 1), (16, 0, 15)])
def test_auto_threads_keep_one_core_and_split_the_rest_between_the_gpus(cores, gpus, expected):
    assert threads_per_job("auto", cores, gpus) == expected
    assert threads_per_job(8, cores, gpus) == 8  # a number is kept as it is


def test_slots_are_exclusive_and_a_killed_holder_frees_its_slot(tmp_path):
    first, second = start_holder("0,1", tmp_path), start_holder("0,1", tmp_path)
    waiting = None
    try:
        claimed = {printed_within(first, 60), printed_within(second, 60)}
        assert claimed == {"0", "1"}
        waiting = start_holder("0,1", tmp_path)
        assert printed_within(waiting, 2.0) is None  # both slots taken: the third waits
        # A holder killed without any clean-up (as by the OOM killer) must not keep its GPU.
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert printed_within(waiting, 60) in claimed
    finally:
        for process in (first, second, waiting):
            if process is not None:
                process.kill()
                process.wait()


def test_no_pool_under_slurm(monkeypatch):
    monkeypatch.setenv("PATHMAMBA_GPU_POOL", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert claim_workflow_gpu() is None


def tiny_gpu_config(seeds: int) -> dict:
    config = json.loads(json.dumps(TINY))
    config["datasets"] = {"synthetic-luad": config["datasets"]["synthetic-luad"]}
    config.update(seeds=list(range(seeds)), gpus=2, threads_per_job=1)
    config["train"].update(device="auto", epochs=1)
    return config


def test_dry_run_gives_gpu_jobs_one_unit_and_cpu_jobs_none(tmp_path, snakemake_bin, workflow_env):
    config = tiny_gpu_config(1)
    config["methods"]["gradcam"] = {"hparams": {"backbone": "resnet18"}, "train": {"device": "cpu"}}
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, "--dry-run", "--printshellcmds")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = (result.stdout + result.stderr).split("\nrule ")
    resources = {job.split(":", 1)[0] + "/" + ("gradcam" if "gradcam" in job else "cam"): job
                 for job in jobs if job.startswith(("train", "evaluate"))}
    for name in ("train/cam", "evaluate/cam"):
        assert "gpu=1" in resources[name], resources[name]
    for name in ("train/gradcam", "evaluate/gradcam"):
        assert "gpu=0" in resources[name], resources[name]


@pytest.mark.e2e
def test_six_gpu_jobs_on_two_pretend_gpus_run_two_at_a_time_on_different_gpus(tmp_path, snakemake_bin,
                                                                              workflow_env):
    config = tiny_gpu_config(6)
    env = {**workflow_env, "PATHMAMBA_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    targets = [f"results/tiny/runs/synthetic-luad/cam/seed{seed}/run.json" for seed in config["seeds"]]
    # More cores than jobs: only the gpu resource can keep them to two at a time.
    result = run_snakemake(snakemake_bin, env, tmp_path, config, "--cores", "6", *targets)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = []
    for target in targets:
        target = tmp_path / target
        record = json.loads(target.read_text())
        slot = record["environment"]["gpu_slot"]
        assert slot["pool"] == ["0", "1"]
        assert record["environment"]["cuda_visible_devices"] == slot["gpu"]
        jobs.append((slot["claimed_at"], target.stat().st_mtime, slot["gpu"]))
    most_at_once = 0
    for start, _, _ in jobs:
        running = [gpu for begin, end, gpu in jobs if begin <= start < end]
        most_at_once = max(most_at_once, len(running))
        assert len(running) == len(set(running)), f"two jobs on one GPU at once: {jobs}"
    assert most_at_once == 2, jobs


@pytest.mark.parametrize("cores, threads", [("8", 1), ("32", 7)])
def test_auto_threads_reach_the_jobs_commands(tmp_path, snakemake_bin, workflow_env, cores, threads):
    config = {**tiny_gpu_config(1), "gpus": 4, "threads_per_job": "auto"}
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, "--cores", cores, "--dry-run",
                           "--printshellcmds")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in (result.stdout + result.stderr).splitlines() if "python -m pathmamba train" in line]
    assert commands and all(f"--threads {threads} " in command for command in commands), commands


def test_auto_threads_are_refused_for_a_cluster_run_before_any_job(tmp_path, snakemake_bin, workflow_env):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    config = {**tiny_gpu_config(1), "threads_per_job": "auto"}
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, "--executor", "slurm", "--jobs", "1")
    assert result.returncode != 0
    assert "threads_per_job: auto" in result.stderr and "a cluster run needs a number" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [".snakemake", "config.yaml"]  # nothing ran


@pytest.mark.e2e
def test_auto_threads_give_each_of_four_pretend_gpus_a_job_on_eight_cores(tmp_path, snakemake_bin, workflow_env):
    """With `threads_per_job: 8`, eight cores ran one GPU job at a time; auto gives each (8 - 1) // 4 = 1
    thread, so the four GPUs run four jobs at once."""
    config = {**tiny_gpu_config(4), "gpus": 4, "threads_per_job": "auto"}
    env = {**workflow_env, "PATHMAMBA_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    targets = [f"results/tiny/runs/synthetic-luad/cam/seed{seed}/run.json" for seed in config["seeds"]]
    result = run_snakemake(snakemake_bin, env, tmp_path, config, "--cores", "8", *targets)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = []
    for target in targets:
        record = json.loads((tmp_path / target).read_text())
        assert record["environment"]["threads"] == 1
        slot = record["environment"]["gpu_slot"]
        jobs.append((slot["claimed_at"], (tmp_path / target).stat().st_mtime, slot["gpu"]))
    most_at_once = max(sum(begin <= start < end for begin, end, _ in jobs) for start, _, _ in jobs)
    assert most_at_once == 4, jobs
    assert len({gpu for _, _, gpu in jobs}) == 4
