"""One run per results folder (issue 26, item 3): the experiment lock in ``<results_dir>/<experiment>``
(pathmamba/core/locks.py, taken by the workflow's onstart hook) refuses a second Snakemake naming the
holder, is released however the holder ends, and the refused run deletes nothing of the first."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pathmamba.core.locks import (
    EXPERIMENT_LOCK,
    ExperimentFolderBusy,
    lock_experiment_folder,
    release_experiment_folder,
)

# A process that takes the experiment lock of argv[1], says so, and waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from pathmamba.core.locks import lock_experiment_folder
lock_experiment_folder(Path(sys.argv[1]), Path.cwd())
print("locked", flush=True)
time.sleep(600)
"""


def start_holder(folder: Path, cwd: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "results" / "run"
    holder = start_holder(folder, tmp_path)
    try:
        with pytest.raises(ExperimentFolderBusy) as refused:
            lock_experiment_folder(folder, tmp_path / "elsewhere")
    finally:
        holder.kill()
        holder.wait()
    assert str(refused.value).startswith(
        f"{folder} is in use by another Snakemake run (pid {holder.pid} on host {platform.node()}, working folder "
        f"{tmp_path}, since ")
    assert f"lock {folder / EXPERIMENT_LOCK}); two runs writing one results folder delete each other's files" in str(refused.value)


def test_a_lock_left_by_a_killed_holder_is_taken_over_saying_so(tmp_path):
    folder = tmp_path / "run"
    (folder / "model.pt").parent.mkdir()
    (folder / "model.pt").write_bytes(b"the first run's file")
    holder = start_holder(folder, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    handle, note = lock_experiment_folder(folder, tmp_path)
    try:
        assert note.startswith(f"{folder / EXPERIMENT_LOCK}: taken over from a run that ended without releasing it (pid "
                               f"{holder.pid} on host {platform.node()}, working folder {tmp_path}, since ")
        assert note.endswith(f"; pid {holder.pid} is not running: it was killed or crashed")
        record = json.loads((folder / EXPERIMENT_LOCK).read_text())
        assert record["pid"] == os.getpid() and record["working_folder"] == str(tmp_path)
    finally:
        release_experiment_folder(handle)
    assert (folder / EXPERIMENT_LOCK).read_text() == ""  # released cleanly: the next one takes it without a note
    handle, note = lock_experiment_folder(folder, tmp_path)
    release_experiment_folder(handle)
    assert note is None
    assert (folder / "model.pt").read_bytes() == b"the first run's file"


def wait_for(condition, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


@pytest.mark.e2e
def test_two_working_folders_sharing_one_results_folder(tmp_path, snakemake_bin, workflow_env):
    """The second Snakemake is refused naming the first (pid, host, working folder), deletes nothing, and
    once the first is killed (SIGKILL, no clean-up), takes the lock over, saying whose it was."""
    from test_workflow import TINY, snakemake_command

    results = tmp_path / "shared results"
    config = {**TINY, "results_dir": str(results), "seeds": [0], "threads_per_job": 1,
              "datasets": {"synthetic-luad": {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 4, "size": 32,
                                                            "seed": 0}}},
              "train": {**TINY["train"], "epochs": 1000}}  # the first run is still training when it is killed
    first_folder, second_folder = tmp_path / "first", tmp_path / "second"
    first_folder.mkdir()
    second_folder.mkdir()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(snakemake_command(snakemake_bin, first_folder, config), env=workflow_env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lock = results / "tiny" / EXPERIMENT_LOCK
        holder = json.loads(wait_for(lambda: lock.exists() and lock.read_text()))
        assert holder["pid"] == first.pid and holder["working_folder"] == str(first_folder)
        report = results / "tiny" / "datasets" / "synthetic-luad" / "validation.json"
        wait_for(lambda: report.exists() or first.poll() is not None)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        before = sorted(path for path in results.rglob("*") if path.is_file())

        second = subprocess.run(snakemake_command(snakemake_bin, second_folder, config), env=workflow_env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 1, second.stderr
        assert (f"{results / 'tiny'} is in use by another Snakemake run (pid {first.pid} on host {platform.node()}, "
                f"working folder {first_folder}, since {holder['since']}; lock {lock})") in second.stderr
        assert first.poll() is None  # still running
        assert set(before) <= {path for path in results.rglob("*") if path.is_file()}
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    again = subprocess.run(snakemake_command(snakemake_bin, second_folder, config, "--forcerun", "validate_dataset",
                                             "--until", "validate_dataset"),
                           env=workflow_env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"{lock}: taken over from a run that ended without releasing it (pid {first.pid} on host "
            f"{platform.node()}, working folder {first_folder}, since {holder['since']}); pid {first.pid} is not "
            "running: it was killed or crashed") in again.stderr
    assert lock.read_text() == ""
    assert report.exists()
