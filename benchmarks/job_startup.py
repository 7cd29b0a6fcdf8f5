"""Benchmark: wall time of short ``python -m pathmamba`` jobs started fresh against forked from the fork
server (pathmamba/forkserver.py), side by side in one run.

The demo's jobs look like these: a CAM classifier trained for one epoch on a tiny synthetic dataset (the
optimizer imports torch._dynamo), its evaluation, and the trivial reference. Each job runs ``--repeats``
times each way, alternating, one at a time, with the environment a one-thread workflow job gets; the
table gives the median seconds of the whole call (the caller's start included) and what forking saves.

    python -m benchmarks.job_startup              # 5 repeats
    python -m benchmarks.job_startup --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pathmamba.forkserver import SOCKET_VARIABLE, job_environment, start_server

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pathmamba", *argv], check=False, env=env, cwd=REPO, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "fork server not used" in done.stderr:
        raise RuntimeError(f"{' '.join(argv[:1])} failed or was not forked:\n{done.stderr}")
    return seconds


def job(name: str, work: Path, call: int) -> list[str]:
    """The arguments of job ``name``; outputs in folders of their own per ``call``."""
    data = ["--data-root", str(work / "data")]
    if name == "train cam, 1 epoch":
        return ["train", "--method", "cam", "--dataset", "synthetic-luad", *data, "--seed", "0",
                "--out", str(work / f"run{call}"), "--checkpoint-dir", str(work / f"checkpoints{call}"),
                "--threads", "1", "--hparams", json.dumps({"backbone": "resnet18", "width": 16, "pretrained": "none"}),
                "--settings", json.dumps({"epochs": 1, "batch_size": 16, "device": "cpu", "workers": 0})]
    if name == "evaluate cam":
        return ["evaluate", "--model", str(work / "run0" / "model.pt"), *data, "--out", str(work / f"eval{call}"),
                "--device", "cpu", "--threads", "1"]
    return ["evaluate-trivial", "--dataset", "synthetic-luad", *data, "--out", str(work / f"trivial{call}")]


JOBS = ("train cam, 1 epoch", "evaluate cam", "evaluate-trivial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = job_environment(1, str(REPO))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        subprocess.run([sys.executable, "-m", "pathmamba", "make-demo-data", "--dataset", "synthetic-luad",
                        "--out", str(work / "data"), "--n-train", "64", "--n-val", "16", "--n-test", "16",
                        "--size", "64"], env=env, cwd=REPO, check=True, capture_output=True)
        server = start_server(work / "forkserver.log", env)
        try:
            forked_env = {**env, SOCKET_VARIABLE: str(server.socket_path)}
            rows, calls = [], iter(range(10**6))
            for name in JOBS:  # train first: the evaluations read its run0
                times: dict[str, list[float]] = {"fresh": [], "forked": []}
                for _ in range(args.repeats):
                    times["fresh"].append(timed(job(name, work, next(calls)), env))
                    times["forked"].append(timed(job(name, work, next(calls)), forked_env))
                fresh, forked = statistics.median(times["fresh"]), statistics.median(times["forked"])
                rows.append(f"| {name} | {fresh:.2f} | {forked:.2f} | {fresh - forked:.2f} |")
        finally:
            server.stop()
    print(f"Median wall seconds of {args.repeats} calls each, one at a time, 1 torch thread:\n")
    print("| job | fresh process | forked from the server | saved |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
