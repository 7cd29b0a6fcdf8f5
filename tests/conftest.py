import os
import re
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import pathmamba  # noqa: F401  (sets the CPU pins before any test imports torch or numpy: pathmamba/core/cpu_pins.py)

REPO = Path(__file__).resolve().parents[1]
#: The tissue classes of the published datasets and the demo's; their background is the mask index after
#: them, ignored by the metrics and the losses (pathmamba/data/specs.py: any dataset's is its class count).
NUM_CLASSES = 4
IGNORE_INDEX = NUM_CLASSES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread, as the demo runs its jobs; on a shared 2-core machine more threads mostly wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def snakemake_bin() -> str:
    """The snakemake of the interpreter running the tests (the project's virtualenv)."""
    candidate = Path(sys.executable).with_name("snakemake")
    found = str(candidate) if candidate.exists() else shutil.which("snakemake")
    assert found, "snakemake is not installed beside this Python"
    return found


@pytest.fixture(scope="session")
def workflow_env() -> dict:
    """The environment for snakemake: this Python first on PATH (the rules call `python`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def canonical(tmp_path_factory) -> Path:
    """A tiny synthetic-luad dataset in the published layout (6/3/3 images of 32 px)."""
    from pathmamba.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("canonical") / "luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=6, n_val=3, n_test=3, size=32, seed=0)
    return root


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path: for comparing two trees byte for byte."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def cli_error(argv: list[str], capsys) -> str:
    """The message of a CLI call that must end in an expected error: exit status 2 and no traceback.
    Returns what it wrote to stderr, stripped."""
    from pathmamba.cli import main

    capsys.readouterr()  # what earlier calls wrote
    with pytest.raises(SystemExit) as exited:
        main(argv)
    message = capsys.readouterr().err.strip()
    assert exited.value.code == 2, message
    assert "Traceback" not in message
    return message


def train_like_the_workflow(method: str, dataset: str, data_root: Path, work: Path, entry: dict, settings,
                            seed: int = 0) -> dict:
    """Train ``method`` with its config ``entry`` (``hparams``, and ``stage1.hparams`` for a two-stage
    method) as the workflow's jobs do: a two-stage method's first stage into work/stage1, its pseudo
    masks into work/pseudo_masks, then the method into work/run (checkpoints under work/). Every stage
    with ``settings``; returns the method's run record."""
    from pathmamba.engine.pseudo_masks import write_pseudo_masks
    from pathmamba.engine.registry import get_spec
    from pathmamba.engine.train import train

    stage_inputs = {}
    if get_spec(method).stage1 is not None:
        train(method, dataset, data_root, work / "stage1", work / "checkpoints-stage1", seed,
              entry.get("stage1", {}).get("hparams", {}), settings, stage=1)
        write_pseudo_masks(work / "stage1" / "model.pt", data_root, work / "pseudo_masks", device="cpu")
        stage_inputs = {"stage1_model": work / "stage1" / "model.pt", "pseudo_masks": work / "pseudo_masks"}
    return train(method, dataset, data_root, work / "run", work / "checkpoints", seed, entry.get("hparams", {}),
                 settings, **stage_inputs)


def checkpoint_epoch(path: Path) -> int | None:
    """The last complete epoch in the training checkpoint ``path``; None while there is none readable
    (not written yet, rotated to previous.pt, or replaced while being read)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError):
        return None


def train_preempted_after(epoch: int, method: str, dataset: str, data_root: Path, out_dir: Path,
                          checkpoint_dir: Path, **kwargs) -> int:
    """``pathmamba.engine.train.train`` in this process, sent SIGTERM (as SLURM does before a preemption) once
    ``checkpoint_dir/last.pt`` holds ``epoch`` or a later one: the run stops and keeps its checkpoints,
    as they are before a rerun resumes. Returns the epoch that ``last.pt`` holds."""
    import signal
    import threading
    import time

    from pathmamba.engine.train import TrainingInterrupted, train

    last = Path(checkpoint_dir) / "last.pt"
    stop = threading.Event()

    def send_sigterm_after_epoch() -> None:
        while not stop.is_set():
            if (checkpoint_epoch(last) or 0) >= epoch:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=send_sigterm_after_epoch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(TrainingInterrupted):
            train(method, dataset, data_root, out_dir, checkpoint_dir, **kwargs)
    finally:
        stop.set()
        watcher.join()
    return checkpoint_epoch(last)


# --- a loopback HTTP server for download tests ------------------------------------------------------------


class ArchiveServer(ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes) on 127.0.0.1; can cut the next response short, and can ignore
    Range requests (as many plain servers do). Records the Range header of every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut_next_after: int | None = None
        self.honour_range = True
        self.ranges: list[str | None] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        start = 0
        if requested and self.server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_next_after is not None:
            body, self.server.cut_next_after = body[: self.server.cut_next_after], None
            self.close_connection = True  # the client sees fewer bytes than announced: an interruption
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # gdown closes its first response unread when it resumes with a range request

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ArchiveServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)
