"""Faults named and nothing left behind (issue 26, item 7): every command that makes a temporary folder
removes it when stopped by SIGTERM or Ctrl-C (exit 128 + the signal, one line saying so); a full disk is
one line naming the file, the bytes it needed and the bytes free (a real full file system: a small tmpfs
mounted in a user namespace); archive members that are not what they say are named with their part;
odd paths are resolved before anything is created; bad choices are argparse's one line."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_error
from test_predict import write_image, write_model

from pathmamba.cli import main as cli_main
from pathmamba.data.acquire import ArchiveError, prepare_dataset
from pathmamba.data.readers import DatasetLayoutError
from pathmamba.data.specs import get_dataset_spec
from pathmamba.engine.registry import build_method

LUAD = get_dataset_spec("synthetic-luad")

PYTHON = sys.executable


def start(argv: list[str], tmp_path: Path, cwd: Path = REPO) -> tuple[subprocess.Popen, Path]:
    """``python -m pathmamba <argv>`` in the background, its stderr in a file (a pipe could fill up)."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(err, "w") as handle:
        process = subprocess.Popen([PYTHON, "-m", "pathmamba", *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                                   stderr=handle)
    return process, err


def stop_when(process: subprocess.Popen, condition, signum: int, timeout_s: float = 300.0) -> None:
    """Send ``signum`` to ``process`` as soon as ``condition()`` holds (checked every 5 ms)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, "the command ended before the moment to stop it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    process.send_signal(signum)


def hidden(folder: Path) -> list[str]:
    """The hidden entries of ``folder``: where the commands build their outputs."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def assert_stopped(process: subprocess.Popen, err: Path, command: str, signum: int) -> None:
    assert process.wait(timeout=300) == 128 + signum, err.read_text()[-3000:]
    assert err.read_text().strip().splitlines()[-1] == f"pathmamba {command}: stopped by {signal.Signals(signum).name}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    write_model("cam", path)
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_predict_stopped_leaves_no_building_folder(model, tmp_path, signum):
    write_image(tmp_path / "images" / "large.png", 1600, 1600)  # hundreds of tiles: seconds of work
    work = tmp_path / "work"
    work.mkdir()
    process, err = start(["predict", "--model", str(model), "--input", str(tmp_path / "images"), "--out",
                          str(work / "prediction"), "--batch-size", "1", "--threads", "1"], tmp_path)
    stop_when(process, lambda: hidden(work), signum)
    assert_stopped(process, err, "predict", signum)
    assert list(work.iterdir()) == []


def test_export_stopped_leaves_no_building_folder(tmp_path):
    path = tmp_path / "big model.pt"  # a few hundred MB of weights: the export takes a while
    torch.manual_seed(0)
    model = build_method("cam", num_classes=4, backbone="resnet101", pretrained="none")
    record = {"method": "cam", "stage": None, "hparams": {"backbone": "resnet101", "pretrained": "none"},
              "dataset": "synthetic-luad", "seed": 0, "settings": {"device": "cpu"}, "epoch": 1, "val_mIoU": 0.5,
              "input_size": [64, 64], "state_dict": model.state_dict()}
    torch.save(record, path)
    work = tmp_path / "work"
    work.mkdir()
    process, err = start(["export", "--model", str(path), "--out", str(work / "export")], tmp_path)
    stop_when(process, lambda: hidden(work) and any((work / name).iterdir() for name in hidden(work)), signal.SIGTERM)
    assert_stopped(process, err, "export", signal.SIGTERM)
    assert list(work.iterdir()) == []


def test_pseudo_masks_stopped_leaves_no_building_folder(canonical, tmp_path):
    from pathmamba.core.settings import TrainSettings
    from pathmamba.data.synthetic import make_synthetic_dataset
    from pathmamba.engine.train import train

    settings = TrainSettings(epochs=1, batch_size=4, device="cpu", workers=0)
    train("wsss-tissue", "synthetic-luad", canonical, tmp_path / "stage1", tmp_path / "checkpoints", 0,
          {"backbone": "resnet18", "width": 8, "pretrained": "none"}, settings, stage=1)
    many = tmp_path / "many"  # thousands of training images: seconds of work
    make_synthetic_dataset("synthetic-luad", many, n_train=3000, n_val=3, n_test=3, size=32, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    process, err = start(["pseudo-masks", "--model", str(tmp_path / "stage1" / "model.pt"), "--data-root", str(many),
                          "--out", str(work / "pseudo masks"), "--device", "cpu", "--threads", "1"], tmp_path)
    stop_when(process, lambda: hidden(work), signal.SIGTERM)
    assert_stopped(process, err, "pseudo-masks", signal.SIGTERM)
    assert list(work.iterdir()) == []


def test_make_demo_data_stopped_leaves_no_building_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    process, err = start(["make-demo-data", "--dataset", "synthetic-luad", "--out", str(work / "data"), "--n-train",
                          "5000", "--size", "64"], tmp_path)
    stop_when(process, lambda: hidden(work), signal.SIGTERM)
    assert_stopped(process, err, "make-demo-data", signal.SIGTERM)
    assert list(work.iterdir()) == []


def test_prepare_dataset_stopped_leaves_no_extracting_or_building_folder(tmp_path):
    from pathmamba.data.synthetic import make_synthetic_dataset, zip_folder

    make_synthetic_dataset("synthetic-luad", tmp_path / "luad", n_train=1500, n_val=3, n_test=3, size=64, seed=0)
    archive = zip_folder(tmp_path / "luad", tmp_path / "luad.zip")
    work = tmp_path / "work"
    work.mkdir()
    process, err = start(["prepare-dataset", "--dataset", "synthetic-luad", "--out", str(work / "luad"), "--lock",
                          str(tmp_path / "lock.json"), "--archive", str(archive)], tmp_path)
    stop_when(process, lambda: any(name.startswith(".luad.building-") for name in hidden(work)), signal.SIGTERM)
    assert_stopped(process, err, "prepare-dataset", signal.SIGTERM)
    assert list(work.iterdir()) == []
    assert not (tmp_path / "lock.json").exists()


def test_rehearse_stopped_while_writing_its_archives_leaves_no_building_folder(tmp_path):
    folder = tmp_path / "rehearsal"
    process, err = start(["rehearse", "--folder", str(folder)], tmp_path)

    def building() -> list[Path]:
        return [path for path in folder.rglob(".*.building-*") if path.is_dir()] if folder.exists() else []

    stop_when(process, building, signal.SIGTERM)
    assert_stopped(process, err, "rehearse", signal.SIGTERM)
    assert building() == []
    assert not (folder / "snakemake.log").exists()  # stopped before Snakemake started


def test_a_stop_signal_during_an_import_is_raised_once_the_import_is_done():
    """A SIGTERM handled while a module is being imported is not raised there (the importer may swallow it,
    as a library's bare `except:` did in the rehearsal) but right after the import."""
    from pathmamba.cli import Terminated, _stopping_cleanly

    # Code whose frames look like the import machinery's: the signal is handled inside it.
    importing = compile("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.001)\n"
                        "finished.append(True)\n", "<frozen importlib._bootstrap>", "exec")
    finished = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), _stopping_cleanly():
        exec(importing, {"finished": finished})  # noqa: S102 - our code, under the import machinery's name
        time.sleep(1)  # the deferred stop arrives here
    assert finished == [True]  # the "import" ran to its end
    assert signal.getsignal(signal.SIGTERM) is before


# --- a full disk ------------------------------------------------------------------------------------------


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not unshare_works(), reason="needs `unshare -rm` (user and mount namespaces)")

# Mounts a tmpfs of the given size on the folder, then runs the command there; nothing is read by a shell.
ON_SMALL_DISK = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'


def on_small_disk(size: str, folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    return subprocess.run(["unshare", "-rm", "sh", "-c", ON_SMALL_DISK, "sh", size, str(folder), PYTHON, "-m",
                           "pathmamba", *argv], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def disk_full_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pathmamba {command}: ")
    return line.removeprefix(f"pathmamba {command}: ")


@needs_namespaces
def test_a_checkpoint_on_a_full_disk_is_named_with_the_space_needed_and_free(canonical, tmp_path):
    """Was: torch's "[enforce fail at inline_container.cc] unexpected pos" traceback."""
    full = tmp_path / "full"
    settings = {"epochs": 1, "batch_size": 4, "device": "cpu", "workers": 0}
    result = on_small_disk("256k", full, [
        "train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(canonical), "--seed", "0",
        "--out", str(tmp_path / "run"), "--checkpoint-dir", str(full / "checkpoints"), "--threads", "1",
        "--hparams", json.dumps({"backbone": "resnet18", "width": 8, "pretrained": "none"}),
        "--settings", json.dumps(settings)])
    message = disk_full_line(result, "train")
    head, _, free = message.partition(" bytes to write, ")
    assert re.fullmatch(rf"{re.escape(str(full / 'checkpoints'))}/best-epoch0001\.pt: disk full: \d+", head), head
    assert int(head.rsplit(" ", 1)[1]) > 256 * 1024  # the checkpoint's size, exactly
    assert int(free.split(" ")[0]) <= 256 * 1024
    assert free.endswith(f" bytes free in {full / 'checkpoints'}; free some space there (or give another folder) "
                         "and run again")
    assert not (tmp_path / "run").exists()


@needs_namespaces
def test_an_export_onto_a_full_disk_is_named_and_leaves_no_folder(model, tmp_path):
    full = tmp_path / "full"
    result = on_small_disk("64k", full, ["export", "--model", str(model), "--out", str(full / "export")])
    message = disk_full_line(result, "export")
    assert message.startswith(f"{full / 'export' / 'model.safetensors'}: disk full: about ")
    assert f" bytes free in {full}; " in message
    assert not full.exists() or list(full.iterdir()) == []  # the tmpfs is gone with its namespace


@needs_namespaces
def test_demo_data_onto_a_full_disk_is_named_by_its_file(tmp_path):
    """A writer other than the tool's own helpers (PIL's PNG encoder) meeting a full disk."""
    full = tmp_path / "full"
    result = on_small_disk("64k", full, ["make-demo-data", "--dataset", "synthetic-luad", "--out",
                                         str(full / "data"), "--n-train", "200", "--size", "64"])
    message = disk_full_line(result, "make-demo-data")  # PIL writes to an open file: the error names none
    assert re.fullmatch(rf"{re.escape(str(full / 'data'))}: disk full: more bytes to write, \d+ bytes free in "
                        rf"{re.escape(str(full))}; free some space there \(or give another folder\) and run again",
                        message), message


# --- archives whose members are not what they say (the member and its part named) --------------------------


def archive_with(tmp_path: Path, canonical: Path, extra: dict[str, bytes]) -> Path:
    """A zip of the dataset ``canonical`` under ``luad/``, and the members ``extra`` named exactly as given."""
    archive = tmp_path / "part 1.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(canonical.rglob("*")):
            if path.is_file():
                handle.write(path, f"luad/{path.relative_to(canonical).as_posix()}")
        for member, data in extra.items():
            handle.writestr(zipfile.ZipInfo(member), data)  # ZipInfo keeps the name as given
    return archive


def first_test_image(canonical: Path) -> str:
    return "luad/" + min(canonical.glob("test/img/*.png")).relative_to(canonical).as_posix()


@pytest.mark.parametrize("member", ["/luad/{image}", "/etc/extra.png", "../luad/{image}", "luad/../../outside.png"],
                         ids=["absolute-over-a-file", "absolute-elsewhere", "dotdot-over-a-file", "dotdot-outside"])
def test_a_member_with_an_absolute_or_dotdot_path_is_refused_naming_it_and_its_part(canonical, tmp_path, member):
    """Was: zipfile strips the leading '/' or '..': either a file of the dataset silently replaced, or a
    layout error naming the temporary `.extracting` folder."""
    member = member.format(image=first_test_image(canonical).removeprefix("luad/"))
    archive = archive_with(tmp_path, canonical, {member: b"other bytes"})
    with pytest.raises(ArchiveError) as refused:
        prepare_dataset(LUAD, [archive], tmp_path / "out", tmp_path / "lock.json")
    assert str(refused.value) == (f"{archive}: member {member!r} has an absolute path or a '..' part; a dataset "
                                  "archive holds relative paths only (a hand-made or tampered archive?); nothing "
                                  "extracted")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part 1.zip"]


@pytest.mark.parametrize("spelling", ["luad/./{rest}", "luad//{rest}"], ids=["dot", "double-slash"])
def test_two_spellings_of_one_member_are_refused_as_a_duplicate(canonical, tmp_path, spelling):
    """Was: extracted over each other, the later bytes silently replacing a test image."""
    image = first_test_image(canonical)
    other = spelling.format(rest=image.removeprefix("luad/"))
    archive = archive_with(tmp_path, canonical, {other: b"other bytes"})
    with pytest.raises(ArchiveError) as refused:
        prepare_dataset(LUAD, [archive], tmp_path / "out", tmp_path / "lock.json")
    assert str(refused.value).startswith(f"{image}: twice in {archive} (as {image!r} and {other!r}, both extracted "
                                         f"to {image}); the parts of a dataset must not overlap")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part 1.zip"]


def test_an_archive_without_the_layout_is_named_not_the_extraction_folder(canonical, tmp_path):
    """Was: "<out>.extracting-<pid>/training: no training folder"."""
    archive = archive_with(tmp_path, canonical, {"other/notes.png": b"not the dataset"})
    with pytest.raises(DatasetLayoutError) as refused:
        prepare_dataset(LUAD, [archive], tmp_path / "out", tmp_path / "lock.json")
    assert str(refused.value).startswith("part 1.zip (extracted)/training: no training folder; expected ")
    assert ".extracting" not in str(refused.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part 1.zip"]


# --- odd paths and bad choices: one line, exit 2, nothing created -------------------------------------------


def test_rehearse_into_a_parent_folder_spelled_with_dotdot_creates_nothing(tmp_path, capsys, monkeypatch):
    """Was: "[Errno 17] File exists: 'x y/..'" and an empty folder `x y` left behind."""
    monkeypatch.chdir(tmp_path)
    message = cli_error(["rehearse", "--folder", "x y/.."], capsys)
    assert message == (f"pathmamba rehearse: {tmp_path} exists and was not created by a rehearsal (no "
                       ".pathmamba-rehearsal in it); give a new folder: a rehearsal writes random weights and "
                       "results there")
    assert list(tmp_path.iterdir()) == []


def test_predict_into_a_folder_spelled_with_dotdot_creates_nothing(model, tmp_path, capsys):
    write_image(tmp_path / "images" / "a.png", 64, 64)
    out = tmp_path / "new" / ".." / "images"  # the input folder itself, which predict did not write
    message = cli_error(["predict", "--model", str(model), "--input", str(tmp_path / "images"), "--out", str(out)],
                        capsys)
    assert message.startswith(f"pathmamba predict: {tmp_path / 'images'} exists and is not a prediction folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["tables", "--methods", "nosuch", "--datasets", "synthetic-luad", "--seeds", "0", "--out-dir", "t"],
     "argument --methods: unknown method 'nosuch'; registered methods: c-cam, cam, "),
    (["calibrate", "--configfile", "config/demo.yaml", "--methods", "cam", "camm"],
     "argument --methods: unknown method 'camm'; registered methods: c-cam, cam, "),
    (["calibrate", "--configfile", "config/demo.yaml", "--device", "gpu"],
     "argument --device: 'gpu' is not a device; expected auto, cpu, cuda or cuda:N"),
    (["predict", "--model", "m.pt", "--input", "i", "--out", "o", "--device", "cuda:x"],
     "argument --device: 'cuda:x' is not a device; expected auto, cpu, cuda or cuda:N"),
], ids=["tables-method", "calibrate-method", "calibrate-device", "predict-device"])
def test_a_bad_choice_is_argparse_s_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    """Was: a KeyError traceback (tables), or the value passed on to fail later."""
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"pathmamba {argv[0]}: error: {expected}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_calibrate_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """Was: a RuntimeError traceback."""
    message = cli_error(["calibrate", "--configfile", str(REPO / "config" / "demo.yaml"), "--device", "cuda",
                         "--out", str(tmp_path / "throughput.json")], capsys)
    assert message.startswith("pathmamba calibrate: device 'cuda' requested (train.device in the workflow config, "
                              "`device` in --settings, or --device), but torch ")
    assert list(tmp_path.iterdir()) == []
