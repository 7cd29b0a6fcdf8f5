"""The fork server (pathmamba/forkserver.py): a forked call gives what a fresh process gives (files,
output, exit status), a call it must not fork or cannot reach runs on its own and says why, signals
reach the forked child, and a changed project source stops the server."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, file_bytes

from pathmamba.forkserver import (
    SOCKET_PATH_LIMIT,
    SOCKET_VARIABLE,
    job_environment,
    start_for_jobs,
    start_server,
)

# The caller's side runs no torch: a forked call's own process stays small and starts in well under a
# second, but the test asserts what it does, never how fast.
PYTHON = str(Path(sys.executable).parent / "python")


@pytest.fixture(scope="module", autouse=True)
def python_first_on_path():
    """This Python first on PATH, as the workflow's jobs find their `python`; for the server and callers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")]))
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("forkserver") / "server.log"
    handle = start_server(log, call_env(None))
    yield handle, log
    handle.stop()
    assert handle.process.returncode is not None
    assert not handle.folder.exists()


def test_the_server_of_one_thread_jobs_has_one_thread_after_its_imports(server):
    handle, log = server
    wait_for(lambda: "ready in" in log.read_text())
    assert os.listdir(f"/proc/{handle.process.pid}/task") == [str(handle.process.pid)]


def call_env(handle, pythonpath_entry=REPO, **changes) -> dict:
    """The environment of a workflow job with one thread: what the server was started for. Without the
    variable pytest changes for every test, which would differ from the server's."""
    env = job_environment(1, str(pythonpath_entry))
    env.pop("PYTEST_CURRENT_TEST", None)
    if handle is not None:
        env[SOCKET_VARIABLE] = str(handle.socket_path)
    env.update(changes)
    return env


def pathmamba(argv, env, cwd=REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pathmamba", *argv], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


def forked_children(log: Path) -> list[str]:
    return re.findall(r"child (\d+) exit", log.read_text())


def test_a_forked_call_writes_and_says_what_a_fresh_process_does(server, tmp_path):
    handle, log = server
    argv = ["make-demo-data", "--dataset", "synthetic-bcss", "--n-train", "6", "--n-val", "3", "--n-test", "3",
            "--size", "32", "--seed", "4"]
    forked = pathmamba([*argv, "--out", str(tmp_path / "forked data")], call_env(handle))
    fresh = pathmamba([*argv, "--out", str(tmp_path / "fresh data")], call_env(None))
    assert forked.returncode == fresh.returncode == 0, forked.stderr + fresh.stderr
    assert "fork server not used" not in forked.stderr
    assert file_bytes(tmp_path / "forked data") == file_bytes(tmp_path / "fresh data")
    assert len(file_bytes(tmp_path / "forked data")) >= 12

    before = len(forked_children(log))
    bad = ["tables", "--seeds", "0", "0", "--out-dir", str(tmp_path / "tables")]
    forked, fresh = pathmamba(bad, call_env(handle)), pathmamba(bad, call_env(None))
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr == fresh.stderr and forked.stderr.startswith("pathmamba tables: ")
    assert len(forked_children(log)) == before + 1


def test_a_call_with_another_environment_runs_on_its_own_and_says_why(server):
    handle, log = server
    result = pathmamba(["--version"], call_env(handle, OMP_NUM_THREADS="3"))
    assert result.returncode == 0 and result.stdout.startswith("pathmamba ")
    assert "fork server not used (the environment differs from the server's in OMP_NUM_THREADS)" in result.stderr
    assert "refused --version: the environment differs from the server's in OMP_NUM_THREADS" in log.read_text()


def test_an_unreachable_server_leaves_the_call_to_run_on_its_own(tmp_path):
    result = pathmamba(["--version"], call_env(None, **{SOCKET_VARIABLE: str(tmp_path / "no server")}))
    assert result.returncode == 0 and result.stdout.startswith("pathmamba ")
    assert f"fork server not used ({tmp_path / 'no server'}: " in result.stderr


def wait_for(condition, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def start_long_training(handle, tmp_path) -> tuple[subprocess.Popen, Path]:
    data = tmp_path / "data"
    made = pathmamba(["make-demo-data", "--dataset", "synthetic-luad", "--out", str(data), "--n-train", "8",
                      "--n-val", "4", "--n-test", "4", "--size", "32"], call_env(handle))
    assert made.returncode == 0, made.stderr
    checkpoints = tmp_path / "checkpoints"
    settings = {"epochs": 10000, "batch_size": 4, "device": "cpu", "workers": 0}
    caller = subprocess.Popen(
        [PYTHON, "-m", "pathmamba", "train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root",
         str(data), "--seed", "0", "--out", str(tmp_path / "run"), "--checkpoint-dir", str(checkpoints),
         "--hparams", json.dumps({"backbone": "resnet18", "width": 8, "pretrained": "none"}),
         "--settings", json.dumps(settings), "--threads", "1"],
        env=call_env(handle), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (checkpoints / "last.pt").exists())
    return caller, checkpoints


def child_pid(log: Path, before: int) -> int:
    """The pid of the child forked after the server's first ``before`` children, once it exited."""
    return int(wait_for(lambda: forked_children(log)[before:])[0])


def test_sigterm_to_the_caller_reaches_the_forked_training(server, tmp_path):
    handle, log = server
    caller, checkpoints = start_long_training(handle, tmp_path)
    before = len(forked_children(log))
    caller.send_signal(signal.SIGTERM)
    _out, err = caller.communicate(timeout=120)
    # train's own answer to SIGTERM (a checkpoint, then 128 + 15), passed back through the caller
    assert caller.returncode == 128 + signal.SIGTERM, err
    assert (checkpoints / "last.pt").exists()
    pid = child_pid(log, before)
    assert f"child {pid} exit {128 + signal.SIGTERM}" in log.read_text()


def test_a_killed_caller_takes_its_forked_child_with_it(server, tmp_path):
    handle, log = server
    caller, _checkpoints = start_long_training(handle, tmp_path)
    before = len(forked_children(log))
    caller.kill()
    caller.wait()
    pid = child_pid(log, before)
    text = log.read_text()
    assert f"caller of child {pid} is gone: stopping the child" in text
    assert not Path(f"/proc/{pid}").exists()


def test_a_changed_project_source_stops_the_server(tmp_path, monkeypatch):
    checkout = tmp_path / "a checkout"
    for package in ("pathmamba", "baselines"):
        shutil.copytree(REPO / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(checkout)
    log = tmp_path / "server.log"
    handle = start_server(log, call_env(None, pythonpath_entry=checkout))
    try:
        env = call_env(handle, pythonpath_entry=checkout)
        first = pathmamba(["--version"], env, cwd=checkout)
        assert first.returncode == 0 and "fork server not used" not in first.stderr, first.stderr
        edited = checkout / "pathmamba" / "cli.py"
        edited.write_text(edited.read_text() + "\n")
        second = pathmamba(["--version"], env, cwd=checkout)
        assert second.returncode == 0
        assert f"project sources changed since the server started: {edited}" in second.stderr
        assert handle.process.wait(timeout=30) == 0
        assert "stopping: project sources changed" in log.read_text()
    finally:
        handle.stop()


def long_folder(tmp_path: Path) -> Path:
    """A folder whose path is too long for a Unix socket in it (a TMPDIR deep in a scratch file system)."""
    folder = tmp_path / ("a-long-scratch-folder-name-" * 5)
    folder.mkdir()
    assert len(str(folder / "pathmamba-forkserver-12345678" / "socket")) > SOCKET_PATH_LIMIT
    return folder


def test_a_long_tmpdir_puts_the_socket_under_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(long_folder(tmp_path)))
    monkeypatch.setattr("tempfile.tempdir", None)  # looked up again from TMPDIR
    handle = start_server(tmp_path / "server.log", call_env(None))
    try:
        assert handle.folder.parent == Path("/tmp") and handle.folder.name.startswith("pathmamba-forkserver-")
        result = pathmamba(["--version"], call_env(handle))
        assert result.returncode == 0 and "fork server not used" not in result.stderr, result.stderr
    finally:
        handle.stop()
    assert not handle.folder.exists()


def test_a_socket_path_too_long_fails_the_server_and_leaves_no_folder(tmp_path):
    folder = long_folder(tmp_path) / "pathmamba-forkserver-12345678"
    folder.mkdir()
    result = subprocess.run([PYTHON, "-m", "pathmamba.forkserver", "--socket", str(folder / "socket"), "--own-folder"],
                            env=call_env(None), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stderr.strip().endswith("OSError: AF_UNIX path too long")
    assert not folder.exists()


def test_a_server_that_cannot_start_leaves_the_run_to_go_on_with_one_warning(tmp_path):
    warnings = []
    no_python = call_env(None, PATH=str(tmp_path))
    assert start_for_jobs(tmp_path / "server.log", no_python, warnings.append) is None
    assert warnings == [("fork server not started (no `python` on PATH, the interpreter the workflow's jobs run); "
                         "each job starts its own process")]


# Starts a server as the workflow does, says its pid and socket, and waits to be killed.
STARTER = """
import os, sys, time
from pathlib import Path
from pathmamba.forkserver import start_server
handle = start_server(Path(sys.argv[1]), dict(os.environ))
print(handle.process.pid, handle.socket_path, flush=True)
time.sleep(600)
"""


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie that nobody reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sigkill_of_the_process_that_started_the_server_ends_it_its_child_and_its_folder(tmp_path):
    """Snakemake killed with SIGKILL runs no clean-up: the server notices that its parent is gone, stops
    its running children and removes its socket folder by itself."""
    log = tmp_path / "server.log"
    starter = subprocess.Popen([PYTHON, "-c", STARTER, str(log)], env=call_env(None), cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    pid, socket_path = starter.stdout.readline().split()
    server = SimpleNamespace(process=SimpleNamespace(pid=int(pid)), socket_path=Path(socket_path))
    caller, _checkpoints = start_long_training(server, tmp_path)
    starter.kill()
    starter.wait()
    _out, err = caller.communicate(timeout=120)
    assert caller.returncode == 128 + signal.SIGTERM, err  # the forked training stopped as on SIGTERM
    assert "fork server not used" not in err
    wait_for(lambda: ended(int(pid)))
    assert "stopping: the process that started it ended; 1 children still running are stopped" in log.read_text()
    assert not server.socket_path.parent.exists()


@pytest.mark.e2e
def test_a_workflow_run_with_the_server_gives_the_run_without_it(tmp_path, snakemake_bin, workflow_env):
    """Every job of a local run forks from the server, which is gone afterwards; models, scores and
    tables are byte-for-byte those of the same run without it."""
    from test_workflow import TINY, run_snakemake

    config = {**TINY, "seeds": [0], "datasets": {"synthetic-luad": TINY["datasets"]["synthetic-luad"]},
              "threads_per_job": 1}
    runs, messages = {}, {}
    for forkserver in (True, False):
        work = tmp_path / f"forkserver {forkserver}"
        work.mkdir()
        result = run_snakemake(snakemake_bin, workflow_env, work, {**config, "forkserver": forkserver})
        assert result.returncode == 0, result.stderr[-4000:]
        runs[forkserver], messages[forkserver] = work / "results" / "tiny", result.stderr
        logs = "".join(path.read_text() for path in (runs[forkserver] / "logs").rglob("*.log"))
        assert "fork server not used" not in logs
    log = (runs[True] / "logs" / "forkserver.log").read_text()
    jobs = len(re.findall(r"child \d+ exit 0", log))
    assert jobs == 7, log  # make data, validate, trivial, train, evaluate, tables, figures
    assert "stopping: signal 15" in log
    server_pid = int(re.search(r"fork server for the jobs: pid (\d+)", messages[True]).group(1))
    assert not Path(f"/proc/{server_pid}").exists()
    assert not (runs[False] / "logs" / "forkserver.log").exists()

    def outputs(results: Path) -> dict[str, bytes]:
        files = {**file_bytes(results / "tables"), **file_bytes(results / "runs")}
        # run.json and test_metrics.json record the environment, history.csv the seconds of each epoch
        return {name: content for name, content in files.items()
                if Path(name).name not in ("run.json", "test_metrics.json", "history.csv")}

    assert outputs(runs[True]) == outputs(runs[False])
    for path in (runs[True] / "runs").rglob("test_metrics.json"):
        with_server, without = (json.loads(p.read_text())["protocols"]
                                for p in (path, runs[False] / path.relative_to(runs[True])))
        assert with_server == without


def processes_mentioning(text: str) -> list[str]:
    """The command lines of the running processes that mention ``text`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and not ended(int(proc.name)):
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


def tiny_forkserver_config(**changes) -> dict:
    from test_workflow import TINY

    return {**TINY, "seeds": [0], "forkserver": True, "threads_per_job": 1,
            "datasets": {"synthetic-luad": {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}}},
            **changes}


@pytest.mark.e2e
def test_sigkill_of_snakemake_with_a_long_tmpdir_leaves_no_server_folder_or_process(tmp_path, snakemake_bin,
                                                                                   workflow_env):
    from test_workflow import TINY, snakemake_command

    work = tmp_path / "work"
    work.mkdir()
    config = tiny_forkserver_config(train={**TINY["train"], "epochs": 1000})  # still training when killed
    output = tmp_path / "snakemake.log"
    with open(output, "w") as log:
        snakemake = subprocess.Popen(snakemake_command(snakemake_bin, work, config),
                                     env={**workflow_env, "TMPDIR": str(long_folder(tmp_path))}, stdout=log,
                                     stderr=subprocess.STDOUT)
    try:
        started = wait_for(lambda: re.search(r"fork server for the jobs: pid (\d+), socket (\S+),", output.read_text()))
        wait_for(lambda: list((work / "results" / "tiny" / "checkpoints").rglob("last.pt")))
    finally:
        snakemake.kill()
        snakemake.wait()
    server_pid, socket_path = int(started.group(1)), Path(started.group(2))
    assert socket_path.parent.parent == Path("/tmp")
    wait_for(lambda: ended(server_pid) and not processes_mentioning(str(work)))
    assert not socket_path.parent.exists()
    server_log = (work / "results" / "tiny" / "logs" / "forkserver.log").read_text()
    assert "stopping: the process that started it ended; 1 children still running are stopped" in server_log
    assert re.search(rf"child \d+ exit {128 + signal.SIGTERM} after .*: train", server_log)


@pytest.mark.e2e
def test_no_server_for_jobs_of_several_threads_saying_why(tmp_path, snakemake_bin, workflow_env):
    from test_workflow import run_snakemake

    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, tiny_forkserver_config(threads_per_job=2),
                           "--until", "validate_dataset")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forkserver: true, but no fork server: threads_per_job is 2; the server is for jobs of one thread" in result.stderr
    assert "fork server for the jobs" not in result.stderr
    assert not (tmp_path / "results" / "tiny" / "logs" / "forkserver.log").exists()
