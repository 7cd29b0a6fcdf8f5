"""The SLURM profile on a real single-node SLURM cluster (tests/cluster/single_node_slurm.sh).

Runs a tiny grid with `--workflow-profile workflow/profiles/slurm` (executor plugin
snakemake-executor-plugin-slurm), cancels one training job with `scancel` after its first epoch (what a
preemption does) and checks that `retries` resubmitted it with the resources of attempt 2, that it resumed
from its checkpoint, that the tables equal a local uninterrupted run's, and that the GPU rules were
submitted with a GPU request and the CPU rules without one. Needs root (installs and starts the daemons);
skipped elsewhere, or when SLURM cannot be set up, unless PATHMAMBA_REQUIRE_SLURM=1 (CI: .ci/run), where
both are failures.
"""

import csv
import importlib.util
import os
import re
import subprocess
import time

import pytest
import yaml
from conftest import REPO, checkpoint_epoch

SETUP = REPO / "tests" / "cluster" / "single_node_slurm.sh"
REQUIRED = os.environ.get("PATHMAMBA_REQUIRE_SLURM") == "1"
# The whole SLURM run, hard: a mis-set status command makes the plugin poll for ever.
RUN_TIMEOUT_S = 600

# Two seeds: two GPU jobs at once on the node's two fake GPUs. Training is deterministic on CPU. Epochs
# of one or two seconds: enough of them to cancel seed 0's training between its first epoch and its end.
EPOCHS = 6
TINY = {
    "run": "tiny",
    "seeds": [0, 1],
    "threads_per_job": 1,
    "datasets": {"synthetic-luad": {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}}},
    "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 1e-3, "device": "cpu", "workers": 0},
    "evaluate": {"n_masks": 1},
    "methods": {"cam": {"hparams": {"backbone": "resnet18", "pretrained": "none"}}},
}
TARGET = "results/tiny/tables/comparison.csv"
GPU_RULES = {"train_stage1", "pseudo_masks", "train", "evaluate"}
# The training job cancelled mid-training: its checkpoint, log, and the Comment the plugin gives its job.
SEED0_CHECKPOINT = "results/tiny/checkpoints/synthetic-luad/cam/seed0/last.pt"
SEED0_TRAIN_LOG = "results/tiny/logs/synthetic-luad/cam/seed0/train.log"
SEED0_TRAIN_COMMENT = "rule_train_wildcards_synthetic-luad_cam_0"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"PATHMAMBA_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node SLURM with two fake GPUs; stopped afterwards by its daemons' PID files."""
    if os.geteuid() != 0:
        unavailable("SLURM set-up needs root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable("snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')")
    started = subprocess.run(["timeout", "-k", "10", "300", str(SETUP), "start"], capture_output=True, text=True,
                             check=False)
    if started.returncode != 0:
        unavailable(f"{SETUP.name} start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    yield
    subprocess.run(["timeout", "-k", "10", "60", str(SETUP), "stop"], check=True)


def start_snakemake(snakemake_bin, env, workdir, *extra, timeout_s):
    """Start snakemake on TINY in ``workdir`` under a hard timeout, its output to snakemake.log there."""
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    command = ["timeout", "-k", "10", str(timeout_s), snakemake_bin,
               "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), *extra, TARGET]
    with open(workdir / "snakemake.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process, workdir) -> str:
    """Wait for a :func:`start_snakemake` process; its log, asserting that it succeeded."""
    process.wait()
    log = (workdir / "snakemake.log").read_text()
    assert process.returncode == 0, f"rc {process.returncode} of {process.args}\n{log[-6000:]}"
    return log


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge = 600 s)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def cancel_training_mid_run(slurm_run, workdir) -> tuple[str, int]:
    """`scancel` seed 0's training job once its checkpoint holds a complete epoch and epochs are left;
    its SLURM job id and the checkpoint's epoch seen before the cancel."""
    while slurm_run.poll() is None:  # the run's hard timeout ends this loop too
        epoch = checkpoint_epoch(workdir / SEED0_CHECKPOINT)
        if epoch is not None and epoch < EPOCHS:
            running = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i %k"],
                                     capture_output=True, text=True, check=True).stdout
            job_ids = [job_id for job_id, comment in (line.split() for line in running.splitlines())
                       if comment == SEED0_TRAIN_COMMENT]
            assert len(job_ids) == 1, running
            subprocess.run(["scancel", job_ids[0]], check=True)
            return job_ids[0], epoch
        time.sleep(0.5)
    pytest.fail(f"the SLURM run ended (rc {slurm_run.returncode}) before seed 0's training was cancelled")


def minutes(slurm_time: str) -> int:
    """Minutes of a SLURM time limit under a day, HH:MM:SS."""
    hours, mins, _ = map(int, slurm_time.split(":"))
    return 60 * hours + mins


def read_rows(path):
    with open(path) as handle:
        return sorted((row["dataset"], row["method"], row) for row in csv.DictReader(handle))


@pytest.mark.slurm
def test_slurm_profile_runs_the_grid_with_gpu_requests_and_resumes_a_cancelled_job(
        slurm_cluster, tmp_path, snakemake_bin, workflow_env):
    # The local run, for the reference tables, runs meanwhile: the SLURM run mostly waits.
    local_run = start_snakemake(snakemake_bin, workflow_env, tmp_path / "local", "--cores", "1",
                                timeout_s=RUN_TIMEOUT_S)
    slurm_run = start_snakemake(snakemake_bin, workflow_env, tmp_path / "slurm",
                                "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                                # No accounting database on the test node: sacct fails, squeue answers.
                                "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                                "--slurm-keep-successful-logs", timeout_s=RUN_TIMEOUT_S)
    try:
        cancelled, cancelled_after_epoch = cancel_training_mid_run(slurm_run, tmp_path / "slurm")
        log = finish(slurm_run, tmp_path / "slurm")
        finish(local_run, tmp_path / "local")
    finally:
        for process in (slurm_run, local_run):
            if process.poll() is None:
                process.terminate()  # `timeout` passes the signal on to snakemake
    print(f"\nscancel {cancelled} (seed 0's training) when its checkpoint held epoch {cancelled_after_epoch}")
    # Snakemake's own lines; the failed job's logs quoted in between (show-failed-logs) have their own.
    snakemake_lines = r"Job \d+ has been submitted|Finished jobid|\d+ of \d+ steps|    message: SLURM-job"
    print("\n".join(line for line in log.splitlines() if re.match(snakemake_lines, line)))
    print(re.findall(r"^Elapsed time: .*", log, re.MULTILINE)[-1])

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    jobs = {job_id: slurm_job(job_id) for job_id in submitted}
    for job_id, job in jobs.items():
        print(f"SLURM job {job_id}: {job['Comment']} {job['JobState']} gres={job.get('TresPerJob', '-')} "
              f"{job['TRES']} time-limit={job['TimeLimit']} elapsed={job['RunTime']}")
    rules = {job_id: re.match(r"rule_(\w+?)(_wildcards|$)", job["Comment"]).group(1) for job_id, job in jobs.items()}
    # Seed 0's training twice (cancelled, resubmitted), seed 1's once.
    assert sorted(rules.values()).count("train") == 3 and sorted(rules.values()).count("evaluate") == 2
    assert {"make_demo_data", "evaluate_trivial", "tables"} <= set(rules.values())
    for job_id, job in jobs.items():
        assert job["JobState"] == ("CANCELLED" if job_id == cancelled else "COMPLETED"), (job_id, job)
        if rules[job_id] in GPU_RULES:
            assert job.get("TresPerJob") == "gres:gpu:1", (rules[job_id], job)
        else:
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", ""), (rules[job_id], job)
    # The plugin's own logs name the SLURM job of every GPU job.
    slurm_logs = tmp_path / "slurm" / ".snakemake" / "slurm_logs"
    assert len(list((slurm_logs / "rule_train").glob("*/*.log"))) == 3

    # The plugin saw the cancel as a failure; `retries` resubmitted the job, with attempt 2's resources
    # (the rule's memory and time limit grow with the attempt).
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in log
    seed0_trainings = [job_id for job_id, job in jobs.items() if job["Comment"] == SEED0_TRAIN_COMMENT]
    assert len(seed0_trainings) == 2 and seed0_trainings[0] == cancelled, seed0_trainings
    first, second = jobs[cancelled], jobs[seed0_trainings[1]]
    assert int(second["MinMemoryNode"].rstrip("M")) == 2 * int(first["MinMemoryNode"].rstrip("M"))
    assert minutes(second["TimeLimit"]) == 2 * minutes(first["TimeLimit"])
    # The cancel reached the training process as SIGTERM: it stopped, keeping the last complete epoch's
    # checkpoint (its train.log, overwritten by attempt 2, is quoted in the log: show-failed-logs).
    stopped = re.search(r"received SIGTERM: stopped during epoch \d+; \S+ holds epoch (\d+)", log)
    assert stopped and int(stopped.group(1)) >= cancelled_after_epoch, log[-6000:]
    # The second attempt resumed from that checkpoint.
    train_log = (tmp_path / "slurm" / SEED0_TRAIN_LOG).read_text()
    resumed = re.search(r"resuming from \S+/last\.pt after epoch (\d+)", train_log)
    assert resumed and resumed.group(1) == stopped.group(1), train_log
    print(f"job {cancelled}: {stopped.group(0)}\njob {seed0_trainings[1]}: {resumed.group(0)}")

    on_slurm = read_rows(tmp_path / "slurm" / TARGET)
    local = read_rows(tmp_path / "local" / TARGET)
    print("comparison.csv, SLURM run (seed 0 cancelled and resumed) vs local uninterrupted run:")
    for (dataset, method, row), (_, _, local_row) in zip(on_slurm, local, strict=True):
        print(f"  {dataset} {method}: mIoU {row['mIoU_mean']} vs {local_row['mIoU_mean']}, "
              f"mDice {row['mDice_mean']} vs {local_row['mDice_mean']}")
    assert [key[:2] for key in on_slurm] == [("synthetic-luad", "cam"), ("synthetic-luad", "trivial")]
    assert on_slurm == local


def test_gres_profile_differs_only_in_how_it_asks_for_the_gpu():
    profiles = REPO / "workflow" / "profiles"
    gpus = yaml.safe_load((profiles / "slurm" / "config.yaml").read_text())
    gres = yaml.safe_load((profiles / "slurm-gres" / "config.yaml").read_text())
    assert gpus["set-resources"] == {rule: {"gpu": 1} for rule in sorted(GPU_RULES)}
    # `gpu: 0` beside the gres: the plugin refuses a job asking for a GPU both ways.
    assert gres["set-resources"] == {rule: {"gres": "gpu:1", "gpu": 0} for rule in sorted(GPU_RULES)}
    assert {k: v for k, v in gpus.items() if k != "set-resources"} == {
        k: v for k, v in gres.items() if k != "set-resources"}
    assert gpus["executor"] == "slurm" and "default-resources" not in gpus
