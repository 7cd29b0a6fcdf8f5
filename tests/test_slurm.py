"""The SLURM profile on a real single-node SLURM cluster (tests/cluster/single_node_slurm.sh).

Runs a tiny grid with a user's profile beside `--workflow-profile workflow/profiles/slurm` (executor
plugin snakemake-executor-plugin-slurm) and the config's `slurm` block, cancels one training job with
`scancel` after its first epoch (what a preemption does) and checks, in what `scontrol show job` reports
of every job sbatch received: that `retries` resubmitted it with the resources of attempt 2 (its time
limit cut at `slurm.max_runtime_hours`), that it resumed from its checkpoint, that the tables equal a
local uninterrupted run's, that GPU rules asked for a GPU and went to the GPU partition and CPU rules to
the CPU partition, and that the user's account and per-rule resources were applied. Then runs the
controller script (workflow/profiles/slurm/controller.sbatch) as a SLURM job, cancels it mid-run and
submits it again. Needs root (installs and starts the daemons); skipped elsewhere, or when SLURM cannot
be set up, unless PATHMAMBA_REQUIRE_SLURM=1 (CI: .ci/run), where both are failures. The profile
precedence is also checked without SLURM, in dry runs.
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

from pathmamba.operations.doctor import FAIL, OK, check_slurm_time_limits, slurm_minutes
from pathmamba.operations.plan import load_workflow_config

SETUP = REPO / "tests" / "cluster" / "single_node_slurm.sh"
REQUIRED = os.environ.get("PATHMAMBA_REQUIRE_SLURM") == "1"
# The whole SLURM run, hard: a mis-set status command makes the plugin poll for ever.
RUN_TIMEOUT_S = 600

# Two seeds: two GPU jobs at once on the node's two fake GPUs. Training is deterministic on CPU (`auto`
# finds no CUDA on the node; the GPU rules still ask SLURM for a GPU, as for `cuda`). Epochs of one or
# two seconds: enough of them to cancel seed 0's training between its first epoch and its end.
EPOCHS = 6
TINY = {
    "experiment": "tiny",
    "seeds": [0, 1],
    "threads_per_job": 1,
    "datasets": {"synthetic-luad": {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}}},
    "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 1e-3, "device": "auto", "workers": 0},
    "evaluate": {"n_masks": 1},
    "methods": {"cam": {"hparams": {"backbone": "resnet18", "pretrained": "none"}}},
}
# Training's time limit is 8 min at attempt 1 (the plan's estimate x 1.5) and would be 16 at attempt 2:
# the maximum cuts it to 12. The partitions are single_node_slurm.sh's.
SLURM_BLOCK = {"gpu_partition": "gpu", "cpu_partition": "cpu", "max_runtime_hours": 0.2}
# A user's own profile: an account for every job, and evaluate's partition, time and memory, which win over
# the rules' and the config's.
USER_PROFILE = {
    "default-resources": {"slurm_account": "pathmamba-ci"},
    "set-resources": {"evaluate": {"slurm_partition": "debug", "runtime": 7, "mem_mb": 1500}},
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
    """Start snakemake on TINY with SLURM_BLOCK in ``workdir`` under a hard timeout, its output to
    snakemake.log there."""
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump({**TINY, "slurm": SLURM_BLOCK}))
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
    user_profile = tmp_path / "user-profile"
    user_profile.mkdir()
    (user_profile / "config.yaml").write_text(yaml.safe_dump(USER_PROFILE))
    # The local run, for the reference tables, runs meanwhile: the SLURM run mostly waits.
    local_run = start_snakemake(snakemake_bin, workflow_env, tmp_path / "local", "--cores", "1",
                                timeout_s=RUN_TIMEOUT_S)
    slurm_run = start_snakemake(snakemake_bin, workflow_env, tmp_path / "slurm", "--profile", str(user_profile),
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
        print(f"SLURM job {job_id}: {job['Comment']} {job['JobState']} partition={job['Partition']} "
              f"account={job['Account']} gres={job.get('TresPerJob', '-')} {job['TRES']} "
              f"time-limit={job['TimeLimit']} elapsed={job['RunTime']}")
    rules = {job_id: re.match(r"rule_(\w+?)(_wildcards|$)", job["Comment"]).group(1) for job_id, job in jobs.items()}
    # Seed 0's training twice (cancelled, resubmitted), seed 1's once.
    assert sorted(rules.values()).count("train") == 3 and sorted(rules.values()).count("evaluate") == 2
    assert {"make_demo_data", "evaluate_trivial", "tables"} <= set(rules.values())
    for job_id, job in jobs.items():
        assert job["JobState"] == ("CANCELLED" if job_id == cancelled else "COMPLETED"), (job_id, job)
        # The user's profile: its account for every job; evaluate's partition, time and memory.
        assert job["Account"] == "pathmamba-ci", (rules[job_id], job)
        if rules[job_id] == "evaluate":
            assert (job["Partition"], job["TimeLimit"], job["MinMemoryNode"]) == ("debug", "00:07:00", "1500M")
        # The config's partitions, GPU rules asking for a GPU and the others not.
        if rules[job_id] in GPU_RULES:
            assert job.get("TresPerJob") == "gres:gpu:1", (rules[job_id], job)
            assert rules[job_id] == "evaluate" or job["Partition"] == "gpu", (rules[job_id], job)
        else:
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", ""), (rules[job_id], job)
            assert job["Partition"] == "cpu", (rules[job_id], job)
    # The plugin's own logs name the SLURM job of every GPU job.
    slurm_logs = tmp_path / "slurm" / ".snakemake" / "slurm_logs"
    assert len(list((slurm_logs / "rule_train").glob("*/*.log"))) == 3

    # The plugin saw the cancel as a failure; `retries` resubmitted the job, with attempt 2's resources
    # (the rule's memory and time limit grow with the attempt; the time limit up to the maximum).
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in log
    seed0_trainings = [job_id for job_id, job in jobs.items() if job["Comment"] == SEED0_TRAIN_COMMENT]
    assert len(seed0_trainings) == 2 and seed0_trainings[0] == cancelled, seed0_trainings
    first, second = jobs[cancelled], jobs[seed0_trainings[1]]
    assert int(second["MinMemoryNode"].rstrip("M")) == 2 * int(first["MinMemoryNode"].rstrip("M"))
    assert (minutes(first["TimeLimit"]), minutes(second["TimeLimit"])) == (8, 12)  # 16 cut to 0.2 h
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


CONTROLLER = REPO / "workflow" / "profiles" / "slurm" / "controller.sbatch"


def submit_controller(workdir, env) -> str:
    """sbatch the controller script on TINY in ``workdir`` (its log: controller-<job id>.log there); the
    job id."""
    command = ["sbatch", "--parsable", "--chdir", str(REPO), "--output", str(workdir / "controller-%j.log"),
               str(CONTROLLER), TARGET, "--snakefile", str(REPO / "workflow" / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
               # No accounting database on the test node: sacct fails, squeue answers.
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2"]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout.strip()


def active_jobs() -> dict[str, str]:
    """{job id: name} of the jobs SLURM has not finished: pending, running, completing."""
    listed = subprocess.run(["squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING,CONFIGURING",
                             "--format=%i %j"], capture_output=True, text=True, check=True).stdout
    return dict(line.split(maxsplit=1) for line in listed.splitlines())


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s; active jobs {active_jobs()}")
        time.sleep(1)


@pytest.mark.slurm
def test_the_controller_runs_as_a_slurm_job_and_goes_on_after_being_cancelled(slurm_cluster, tmp_path, workflow_env):
    workdir = tmp_path / "controller"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump({**TINY, "slurm": SLURM_BLOCK}))
    controllers = [submit_controller(workdir, workflow_env)]
    epochs_seen = []

    def seed0_between_epochs():
        epochs_seen.append(checkpoint_epoch(workdir / SEED0_CHECKPOINT))
        return epochs_seen[-1] is not None and epochs_seen[-1] < EPOCHS

    try:
        # Cancelled while seed 0 trains between two epochs: the controller's own jobs must go with it.
        wait_until(seed0_between_epochs, RUN_TIMEOUT_S, "seed 0's training under the first controller")
        submitted = set(active_jobs()) - set(controllers)
        assert submitted, "the controller has no job running"
        subprocess.run(["scancel", controllers[0]], check=True)
        wait_until(lambda: not set(active_jobs()) & (submitted | set(controllers)), 60,
                   "the controller and its jobs ending")
        first_log = (workdir / f"controller-{controllers[0]}.log").read_text()
        assert "Terminating processes on user request" in first_log, first_log[-4000:]
        print(f"controller {controllers[0]} cancelled with its jobs {sorted(submitted)} after seed 0's epoch "
              f"{epochs_seen[-1]}")

        controllers.append(submit_controller(workdir, workflow_env))
        wait_until(lambda: controllers[1] not in active_jobs(), RUN_TIMEOUT_S, "the second controller finishing")
    finally:
        left = [job for job in controllers if job in active_jobs()]
        if left:
            subprocess.run(["scancel", *left], check=True)
    second_log = (workdir / f"controller-{controllers[1]}.log").read_text()
    assert "(100%) done" in second_log, second_log[-4000:]
    assert (workdir / TARGET).exists()
    # `rerun-incomplete`: the cancelled training ran again and resumed from its checkpoint.
    train_log = (workdir / SEED0_TRAIN_LOG).read_text()
    resumed = re.search(r"resuming from \S+/last\.pt after epoch (\d+)", train_log)
    assert resumed and int(resumed.group(1)) >= epochs_seen[-1], train_log
    steps = re.findall(r"\d+ of \d+ steps \(100%\) done", second_log)
    print(f"controller {controllers[1]}: {resumed.group(0)}; {steps}")


def dry_run_resources(snakemake_bin, env, workdir, slurm_block, user_profile) -> dict[str, dict[str, str]]:
    """{rule: the resources of its first job} in `snakemake -n` of TINY with ``slurm_block`` and the
    profile ``user_profile`` (a mapping) beside the SLURM workflow profile."""
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump({**TINY, "slurm": slurm_block}))
    (workdir / "profile").mkdir()
    (workdir / "profile" / "config.yaml").write_text(yaml.safe_dump(user_profile))
    done = subprocess.run(
        [snakemake_bin, "-n", TARGET, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
         str(workdir), "--profile", str(workdir / "profile"),
         "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"), "--configfile", str(workdir / "config.yaml")],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resources = {}
    for rule, line in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", done.stdout, re.MULTILINE):
        resources.setdefault(rule, dict(item.split("=", 1) for item in line.split(", ")))
    return resources


def test_a_users_profile_wins_over_the_config_which_wins_over_the_profiles_defaults(
        tmp_path, snakemake_bin, workflow_env):
    profile = {"default-resources": {"slurm_account": "acct", "slurm_partition": "main"},
               "set-resources": {"evaluate": {"runtime": 7, "slurm_partition": "short"}}}
    # No `slurm` block: the user's default partition everywhere, GPUs through `--gpus` (the gpu resource).
    plain = dry_run_resources(snakemake_bin, workflow_env, tmp_path / "plain", {}, profile)
    assert {rule: (r["slurm_account"], r["slurm_partition"]) for rule, r in plain.items() if rule != "all"} == {
        "make_demo_data": ("acct", "main"), "validate_dataset": ("acct", "main"), "train": ("acct", "main"),
        "evaluate": ("acct", "short"), "evaluate_trivial": ("acct", "main"), "tables": ("acct", "main")}
    assert (plain["train"]["gpu"], plain["train"]["runtime"], plain["evaluate"]["runtime"]) == ("1", "8", "7")
    assert "gres" not in plain["train"] and plain["tables"].get("gpu", "0") == "0"
    # Partitions per kind of rule, the GPU as a generic resource, a time limit cut at the maximum.
    configured = dry_run_resources(snakemake_bin, workflow_env, tmp_path / "configured",
                                   {"gpu_partition": "g", "cpu_partition": "c", "gpu_gres": "gpu:a100:1",
                                    "max_runtime_hours": 0.1}, profile)
    assert {rule: r["slurm_partition"] for rule, r in configured.items() if rule != "all"} == {
        "make_demo_data": "c", "validate_dataset": "c", "train": "g", "evaluate": "short",
        "evaluate_trivial": "c", "tables": "c"}
    assert (configured["train"]["gres"], configured["train"]["gpu"], configured["train"]["runtime"]) == (
        "gpu:a100:1", "0", "6")
    assert configured["evaluate"]["runtime"] == "7" and "gres" not in configured["tables"]


def test_the_workflow_profile_leaves_default_and_per_rule_resources_to_the_user():
    # Snakemake reads the user's profile, then the workflow profile: a key in both takes the workflow
    # profile's value whole, so these two blocks there would drop the user's account, partition and caps.
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "default-resources" not in profile and "set-resources" not in profile


def test_slurm_time_limits_as_sinfo_prints_them():
    assert [slurm_minutes(limit) for limit in ("infinite", "30", "30:00", "4:00:00", "2-12", "1-00:00:00")] == [
        None, 30, 30, 240, 3600, 1440]


@pytest.mark.slurm
def test_doctor_reads_the_partitions_time_limits_with_sinfo(slurm_cluster):
    # The paper's grid: its longest job is estimated at hours; single_node_slurm.sh's partitions allow
    # 24 h (gpu), 4 h (cpu) and no limit (debug, the default).
    config = load_workflow_config(REPO / "config" / "config.yaml")
    checks = {}
    for slurm in ({}, {"gpu_partition": "gpu"}, {"gpu_partition": "cpu"}, {"gpu_partition": "gpu", "max_runtime_hours": 48}):
        config["slurm"] = {**config["slurm"], "gpu_partition": None, "max_runtime_hours": 24, **slurm}
        checks[tuple(slurm.values())] = check_slurm_time_limits(config)
        print(slurm, checks[tuple(slurm.values())])
    assert checks[()].status == OK and "partition debug: no limit" in checks[()].detail
    assert checks[("gpu",)].status == OK and "partition gpu: 24 h" in checks[("gpu",)].detail
    assert checks[("cpu",)].status == FAIL and "estimated above the partition's limit" in checks[("cpu",)].detail
    assert checks[("gpu", 48)].status == FAIL and "max_runtime_hours to at most 24" in checks[("gpu", 48)].detail
