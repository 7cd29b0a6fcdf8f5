"""Bad input and faults of issue 26, one test per case: each ends in an error naming the thing at fault
(file, key, value, what is expected), or in a correct result, with nothing lost or half-written.

Covered: diverged training (item 1), config mistakes found by ``check_config`` before any job runs
(item 2), ``calibrate --out`` ownership (item 5), model files checked on load (item 6) and images of
every bit depth in ``predict`` (item 4)."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NUM_CLASSES, REPO, cli_error
from PIL import Image

from pathmamba.cli import main as cli_main
from pathmamba.core.errors import InputError
from pathmamba.engine import train as train_module
from pathmamba.engine.config import ConfigError, check_config, hparams_problems
from pathmamba.engine.predict import predict, read_input_image
from pathmamba.engine.registry import build_method
from pathmamba.engine.train import TrainingDiverged, TrainSettings, train
from pathmamba.operations.doctor import missing_gpu_indices
from pathmamba.reporting.results import Grid, finished_runs
from pathmamba.reporting.tables import write_tables

TINY_CAM = {"backbone": "resnet18", "width": 8, "pretrained": "none"}
SIZE = 32


def _train_argv(data_root: Path, work: Path, settings: dict, hparams: dict = TINY_CAM) -> list[str]:
    return ["train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(data_root),
            "--out", str(work / "run"), "--checkpoint-dir", str(work / "checkpoints"),
            "--hparams", json.dumps(hparams), "--settings", json.dumps({"device": "cpu", "batch_size": 4, **settings})]


# --- a diverged run is never a result (item 1) ------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0e12, float("inf")], ids=["lr-1e12", "lr-inf"])
def test_a_diverging_run_stops_naming_epoch_and_step_and_writes_nothing(canonical, tmp_path, capsys, lr,
                                                                        one_torch_thread):
    message = cli_error(_train_argv(canonical, tmp_path, {"epochs": 2, "lr": lr}), capsys)
    assert message.startswith("pathmamba train: training diverged at epoch 1/2, step ")
    assert ": the training loss is nan; no model.pt written, the run has no result (no epoch was complete); " \
           f"lower train.lr (now {lr:g})" in message
    assert not (tmp_path / "run").exists()  # no model.pt, history.csv or run.json for evaluate to score
    assert not (tmp_path / "checkpoints").exists()  # nothing of the run left: no epoch was complete


def test_a_run_diverging_after_a_finite_epoch_keeps_that_epochs_checkpoint(canonical, tmp_path, monkeypatch,
                                                                           one_torch_thread):
    check = train_module._finite_loss

    def nan_in_epoch_2(model, loss, where):
        return check(model, loss * float("nan") if where.startswith("epoch 2/") else loss, where)

    monkeypatch.setattr(train_module, "_finite_loss", nan_in_epoch_2)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at epoch 2/3, step 1/2: the training loss is "
                                               rf"nan; no model.pt written, the run has no result \("
                                               rf"{tmp_path / 'checkpoints' / 'last.pt'} holds epoch 1, the last "
                                               "finite one\\)"):
        train("cam", "synthetic-luad", canonical, tmp_path / "run", tmp_path / "checkpoints", 0, TINY_CAM,
              TrainSettings(epochs=3, batch_size=4, lr=1e-3, device="cpu"))
    assert not (tmp_path / "run").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_a_non_finite_gradient_under_a_finite_loss_is_named():
    model = torch.nn.Linear(2, 1)
    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    model.weight.grad[0, 1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^epoch 3/5, step 7/9: a gradient is inf \(the loss is -?\d"):
        train_module._finite_loss(model, loss, "epoch 3/5, step 7/9")


def test_the_divergence_check_leaves_a_finite_run_bitwise_unchanged(canonical, tmp_path, monkeypatch,
                                                                    one_torch_thread):
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-3, device="cpu")
    train("cam", "synthetic-luad", canonical, tmp_path / "checked", tmp_path / "ck1", 0, TINY_CAM, settings)
    monkeypatch.setattr(train_module, "_finite_loss", lambda model, loss, where: float(loss.detach()))
    train("cam", "synthetic-luad", canonical, tmp_path / "unchecked", tmp_path / "ck2", 0, TINY_CAM, settings)
    checked, unchecked = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]
                          for name in ("checked", "unchecked"))
    assert checked.keys() == unchecked.keys()
    assert all(torch.equal(checked[key], unchecked[key]) for key in checked)


# --- every config mistake before any job runs (item 2) ----------------------------------------------------


def _config(**methods) -> dict:
    return {"experiment": "r", "seeds": [0], "datasets": {"synthetic-luad": {"synthetic": {}}},
            "methods": methods or {"cam": {"hparams": dict(TINY_CAM)}}}


def _problems(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as error:
        check_config(config)
    return str(error.value).splitlines()[1:]


@pytest.mark.parametrize(("methods", "expected"), [
    ({"cam": {"hparams": {"widht": 8}}},
     "methods.cam.hparams.widht: cam has no such keyword; did you mean 'width'? its keywords: backbone, flip, "),
    ({"cam": {"hparams": {"width": "8"}}}, "methods.cam.hparams.width: '8' is not of type int"),
    ({"cam": {"hparams": {"width": -4}}}, "methods.cam.hparams.width: -4; expected a value >= 1"),
    ({"sc-cam": {"hparams": {"threshold": True}}}, "methods.sc-cam.hparams.threshold: True is not of type float"),
    ({"gradcam": {"hparams": {"scales": 1.0}}},
     "methods.gradcam.hparams.scales: 1.0 is not of type Sequence[float]"),
    ({"histosegnet": {"hparams": {"crf": "off"}}}, "methods.histosegnet.hparams.crf: 'off' is not of type dict | None"),
    ({"pathmamba-b": {"hparams": {"dims": [8, 0, 8, 8]}}},
     "methods.pathmamba-b.hparams.dims: [8, 0, 8, 8]; expected values >= 1"),
    ({"pathmamba": {"hparams": {"dt_rank": 1.5}}}, "methods.pathmamba.hparams.dt_rank: 1.5 is not of type int | str"),
    ({"unet": {"hparams": {"decoder_channels": [64, "32"]}}},
     "methods.unet.hparams.decoder_channels: [64, '32'] is not of type tuple[int, ...]"),
    ({"wsss-tissue": {"stage1": {"hparams": {"pda_start_epoh": 2}}}},
     ("methods.wsss-tissue.stage1.hparams.pda_start_epoh: wsss-tissue has no such keyword; did you mean "
     "'pda_start_epoch'?")),
    ({"pathmamba-noscan": {"hparams": {"scan": "conv"}}},
     "methods.pathmamba-noscan.hparams.scan: was renamed 'mixer' (PathMamba's token mixer"),
], ids=["typo", "string-for-int", "negative-width", "bool-for-float", "number-for-list", "string-for-dict",
        "zero-dim", "float-for-int-or-str", "string-in-int-list", "stage1-typo", "renamed-key"])
def test_an_hparams_mistake_is_refused_at_start_up_naming_method_key_and_value(methods, expected):
    problems = _problems(_config(**methods))
    assert len(problems) == 1 and problems[0].strip().startswith(expected), problems


@pytest.mark.parametrize(("hparams", "epochs", "expected"), [
    ({}, 100, ("methods.sc-cam.train.epochs: 100, but sc-cam's schedule (cam_epochs 15 + round_epochs (31, 41, 51)) "
               "takes 138 epochs; set methods.sc-cam.train.epochs: 138 or change its schedule's hparams")),
    ({"cam_epochs": 2, "round_epochs": [1, 1, 2]}, 6, None),
    ({"cam_epochs": 2, "round_epochs": [1, 1, 2]}, 4, ("methods.sc-cam.train.epochs: 4, but sc-cam's schedule "
                                                      "(cam_epochs 2 + round_epochs [1, 1, 2]) takes 6 epochs")),
])
def test_sccams_own_schedule_must_fill_its_training_epochs(hparams, epochs, expected):
    """SC-CAM keeps the last epoch of its last round: a schedule shorter or longer than train.epochs would
    cut a round short or train past its final model."""
    config = _config(**{"sc-cam": {"hparams": {**TINY_CAM, **hparams}, "train": {"epochs": epochs}}})
    if expected is None:
        check_config(config)
    else:
        assert _problems(config)[0].strip().startswith(expected)


def test_valid_hparams_of_every_shipped_config_pass():
    for path in sorted(Path("config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        methods = config.get("config", config).get("methods") or {}
        assert [problem for method, entry in methods.items() for problem in hparams_problems(method, entry or {})] == []
    check_config(_config(cam={"hparams": {"scales": [1, 1.5], "threshold": 1, "flip": False}},
                         unet={"hparams": {"encoder_kwargs": None, "decoder_channels": [8, 4]}}))


@pytest.mark.parametrize("seeds", [[0, 2**32], [2**40]])
def test_a_seed_beyond_32_bits_is_refused(seeds):
    assert _problems({**_config(), "seeds": seeds}) == [
        f"  seeds: {seeds[-1]} is beyond 4294967295 (2**32 - 1), the largest seed numpy and torch take"]


@pytest.mark.parametrize(("results", "resources"), [("out", "out"), ("work/results", "work"), ("a", "a/b/../b")])
def test_overlapping_results_and_resources_folders_are_refused_naming_both_keys(tmp_path, monkeypatch, results,
                                                                                resources):
    monkeypatch.chdir(tmp_path)
    [problem] = _problems({**_config(), "results_dir": results, "resources_dir": resources})
    assert problem.startswith(f"  results_dir ({results!r}) and resources_dir ({resources!r}) overlap (")
    check_config({**_config(), "results_dir": "work/results", "resources_dir": "work/resources"})


def test_a_cuda_index_this_machine_lacks_is_a_doctor_failure():
    config = {**_config(cam={"train": {"device": "cuda:3"}}), "train": {"device": "cuda:1"}}
    assert missing_gpu_indices(config, 2) == [
        ("methods.cam.train.device: 'cuda:3', but this machine shows 2 GPU(s) (cuda:0..cuda:1); give an index "
        "below 2, or 'cuda'")]
    assert len(missing_gpu_indices(config, 1)) == 2
    assert missing_gpu_indices(config, 4) == []


VALID_YAML = """experiment: r
seeds: [0]
datasets:
  synthetic-luad:
    synthetic: {n_train: 8, n_val: 2, n_test: 2, size: 32, seed: 0}
train: {epochs: 1, device: cpu}
methods:
  cam: {hparams: {width: 8}}
"""


@pytest.mark.parametrize(("text", "expected"), [
    (VALID_YAML + "  cam: {hparams: {width: 16}}\n",
     (", line 9, column 3: key 'cam' given twice in one mapping (first on line 8); the second would silently "
     "replace the first: remove one")),
    (VALID_YAML.replace("seeds: [0]", "seeds: [0]\nexperiment: s"),
     ", line 3, column 1: key 'experiment' given twice in one mapping (first on line 1)"),
    (VALID_YAML.replace("  cam:", "\tcam:"), (", line 8, column 1: found character '\\t' that cannot start any "
                                             "token; expected YAML (spaces, not tabs, for indentation)")),
    (VALID_YAML.replace("seeds: [0]", "seeds: [0"), ", line 3, column 9: expected ',' or ']', but got ':'"),
    ("", ": an empty file; expected a mapping of config keys"),
    ("- experiment: r\n", ": a list; expected a mapping of config keys"),
    (VALID_YAML.replace("experiment: r", "run: r"),
     (": run: was renamed 'experiment' (the name of the experiment folder <results_dir>/<experiment>; a run is "
      "now one training run of it, a dataset, method and seed); write `experiment: r`")),
], ids=["method-twice", "top-key-twice", "tab", "unclosed-list", "empty", "list", "renamed-key"])
@pytest.mark.parametrize("command", ["plan", "doctor", "tables"])
def test_a_broken_config_file_is_one_line_naming_file_line_and_column(tmp_path, capsys, text, expected, command):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    extra = ["--out-dir", str(tmp_path / "tables")] if command == "tables" else []
    message = cli_error([command, "--configfile", str(path), *extra], capsys)
    assert message.startswith(f"pathmamba {command}: {path}{expected}"), message
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize(("text", "expected"), [
    (VALID_YAML + "methods:\n  gradcam: {}\n",
     "{path}, line 9, column 1: key 'methods' given twice in one mapping (first on line 7)"),
    (VALID_YAML.replace("width: 8", "widht: 8").replace("seeds: [0]", "seeds: [0, 4294967296]"),
     "methods.cam.hparams.widht: cam has no such keyword; did you mean 'width'?"),
    (VALID_YAML.replace("experiment: r", "run: r"), "run: was renamed 'experiment' (the name of the experiment folder"),
], ids=["key-twice", "hparams-typo", "renamed-key"])
def test_the_workflow_refuses_a_config_mistake_at_a_dry_run(tmp_path, snakemake_bin, workflow_env, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = subprocess.run([snakemake_bin, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(path), "--cores", "1", "--dry-run"],
                            capture_output=True, text=True, env=workflow_env, timeout=300, check=False)
    assert result.returncode != 0
    assert expected.format(path=path) in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


# --- no command overwrites what it did not write: calibrate --out (item 5) --------------------------------


def _calibrate(config: Path, out: Path) -> list[str]:
    return ["calibrate", "--configfile", str(config), "--out", str(out), "--steps", "1", "--warmup-steps", "0",
            "--device", "cpu", "--threads", "1"]


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(VALID_YAML.replace("width: 8", "width: 8, backbone: resnet18, pretrained: none"))
    return path


@pytest.mark.parametrize(("content", "reason"), [
    (b"my notes\n", "not a JSON file"),
    (b'{"device_type": "cpu", "methods": {}}', "a JSON file without device_name, torch, settings"),
    (b"[1, 2]", "a JSON file without device_type, device_name, torch, settings, methods"),
    (b"\xff\xfe binary", "not a JSON file"),
], ids=["text", "other-json", "json-list", "binary"])
def test_calibrate_refuses_to_replace_a_file_it_did_not_write(tiny_config, tmp_path, capsys, content, reason):
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    message = cli_error(_calibrate(tiny_config, out), capsys)
    assert message == (f"pathmamba calibrate: {out} exists and is not a throughput file written by calibrate "
                       f"({reason}); not replacing it: give another --out, or remove it yourself")
    assert out.read_bytes() == content


def test_calibrate_refuses_a_folder_or_a_link_as_out(tiny_config, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "kept.txt").write_text("kept")
    (tmp_path / "link.json").symlink_to(tmp_path / "kept.txt")
    for out, reason in ((tmp_path / "folder", "not a regular file"), (tmp_path / "link.json", "a symbolic link")):
        message = cli_error(_calibrate(tiny_config, out), capsys)
        assert message.endswith(f"({reason}); not replacing it: give another --out, or remove it yourself")
    assert (tmp_path / "kept.txt").read_text() == "kept" and not any((tmp_path / "folder").iterdir())


def test_calibrate_replaces_its_own_earlier_file(tiny_config, tmp_path, one_torch_thread):
    out = tmp_path / "throughput.json"
    assert cli_main(_calibrate(tiny_config, out)) == 0
    first = json.loads(out.read_text())
    assert cli_main(_calibrate(tiny_config, out)) == 0
    second = json.loads(out.read_text())
    assert list(second["methods"]) == ["cam"] and second["date"] >= first["date"]


# --- model files checked on load (item 6) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_record() -> dict:
    """A tiny untrained cam model.pt record; the checks come before any prediction is scored."""
    model = build_method("cam", num_classes=NUM_CLASSES, **TINY_CAM)
    return {"method": "cam", "stage": None, "dataset": "synthetic-luad", "seed": 0, "hparams": dict(TINY_CAM),
            "settings": {}, "epoch": 1, "val_mIoU": 0.0, "input_size": [SIZE, SIZE],
            "state_dict": model.state_dict()}


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "tile.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(path)
    return path


def _tampered(record: dict, change) -> dict:
    record = {**record, "hparams": dict(record["hparams"]), "state_dict": dict(record["state_dict"])}
    change(record)
    return record


def _first_conv(record: dict) -> str:
    return next(name for name, tensor in record["state_dict"].items() if tensor.dim() == 4)


TAMPERED_MODELS = {
    "unknown-method": (lambda r: r.update(method="cam2"), "method 'cam2' stage None is not a registered method; "),
    "stage-of-a-one-stage-method": (lambda r: r.update(stage=1), "method 'cam' stage 1 is not a registered method"),
    "other-method": (lambda r: r.update(method="unet"),
                     "hparams.backbone: unet has no such keyword; its keywords: decoder_channels, "),
    "unknown-dataset": (lambda r: r.update(dataset="luad"), "dataset 'luad' is unknown; known datasets: "),
    "width-string": (lambda r: r["hparams"].update(width="8"), "hparams.width: '8' is not of type int"),
    "width-negative": (lambda r: r["hparams"].update(width=-8), "hparams.width: -8; expected a value >= 1"),
    "width-changed": (lambda r: r["hparams"].update(width=16),
                      "its weights do not fit the cam model its hparams build: tensor "),
    "tensor-missing": (lambda r: r["state_dict"].pop(_first_conv(r)),
                       "its weights do not fit the cam model its hparams build: tensor "),
    "tensor-extra": (lambda r: r["state_dict"].update(extra=torch.zeros(1)),
                     ("its weights do not fit the cam model its hparams build: tensor extra is not one of the "
                     "model's (1 such)")),
    "input-size-zero": (lambda r: r.update(input_size=[0, SIZE]),
                        "input_size [0, 32]; expected [height, width], two integers >= 1"),
    "no-weights": (lambda r: r.pop("state_dict"), "not a model file written by `train` (it lacks state_dict)"),
    "weights-a-list": (lambda r: r.update(state_dict=[1, 2]),
                       "its weights do not fit the cam model its hparams build: its weights are a list, "),
}


@pytest.mark.parametrize("case", TAMPERED_MODELS)
@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_tampered_model_file_is_refused_naming_file_and_mismatch(model_record, image, tmp_path, capsys, case,
                                                                   command):
    change, expected = TAMPERED_MODELS[case]
    path = tmp_path / "model.pt"
    torch.save(_tampered(model_record, change), path)
    out = tmp_path / "out"
    argv = ["--model", str(path), "--out", str(out)]
    message = cli_error([command, *argv, *(["--input", str(image), "--device", "cpu"] if command == "predict"
                                           else [])], capsys)
    assert message.startswith(f"pathmamba {command}: {path}: {expected}"), message
    assert "\n" not in message and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "tile.png"]  # no building folder left


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(model_record, tmp_path, capsys):
    path = tmp_path / "model.pt"
    name = _first_conv(model_record)
    record = _tampered(model_record, lambda r: r["state_dict"].update({name: torch.zeros(3, 3, 1, 1)}))
    torch.save(record, path)
    message = cli_error(["export", "--model", str(path), "--out", str(tmp_path / "out")], capsys)
    shape = tuple(model_record["state_dict"][name].shape)
    assert message == (f"pathmamba export: {path}: its weights do not fit the cam model its hparams build: tensor "
                       f"{name} has shape (3, 3, 1, 1), the model's {shape}")


def test_an_export_whose_card_was_edited_is_refused_naming_the_weights(model_record, image, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(model_record, path)
    assert cli_main(["export", "--model", str(path), "--out", str(tmp_path / "export")]) == 0
    card_path = tmp_path / "export" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["hparams"]["width"] = 16
    card_path.write_text(json.dumps(card))
    message = cli_error(["predict", "--model", str(tmp_path / "export"), "--input", str(image), "--out",
                         str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert message.startswith(f"pathmamba predict: {tmp_path / 'export' / 'model.safetensors'}: its weights do "
                              "not fit the cam model its card's hparams build (Error(s) in loading state_dict")
    del card["input"]
    card_path.write_text(json.dumps(card))
    message = cli_error(["predict", "--model", str(tmp_path / "export"), "--input", str(image), "--out",
                         str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert message == (f"pathmamba predict: {card_path}: not a complete model card (no 'input'); export the model "
                       "again")
    assert not (tmp_path / "out").exists()


# --- images of every bit depth in predict (item 4) --------------------------------------------------------


def _png_16bit_rgb(path: Path, rgb: np.ndarray) -> Path:
    """A 48-bit RGB PNG (16 bits per channel) of the (H, W, 3) uint16 ``rgb``, written by hand: PIL cannot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = rgb.shape[:2]
    rows = b"".join(b"\x00" + rgb[row].astype(">u2").tobytes() for row in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def rgb8() -> np.ndarray:
    """A (32, 32, 3) uint8 image with every channel varying."""
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([rows * 8, columns * 8, (rows + columns) * 4], axis=-1).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0]


IMAGE_FILES = {
    # name: (writer of the file from the 8-bit image, what predict must read: the 8-bit image it stands for)
    "gray-8": (lambda path, rgb: Image.fromarray(_gray(rgb)).save(path), lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "gray-16": (lambda path, rgb: Image.fromarray(_gray(rgb).astype(np.uint16) * 257).save(path),
                lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "gray-16-tiff": (lambda path, rgb: Image.fromarray(_gray(rgb).astype(np.uint16) * 257).save(path.with_suffix(".tif")),
                     lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "rgb-16": (lambda path, rgb: _png_16bit_rgb(path, rgb.astype(np.uint16) * 257), lambda rgb: rgb),
    "rgba-opaque": (lambda path, rgb: Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(path),
                    lambda rgb: rgb),
    "la-opaque": (lambda path, rgb: Image.fromarray(_gray(rgb)).convert("LA").save(path),
                  lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "palette": (lambda path, rgb: Image.fromarray(rgb).quantize(16).save(path),
                lambda rgb: np.asarray(Image.fromarray(rgb).quantize(16).convert("RGB"))),
    "bilevel": (lambda path, rgb: Image.fromarray(_gray(rgb) > 127).save(path),
                lambda rgb: np.repeat(np.where(_gray(rgb) > 127, 255, 0).astype(np.uint8)[..., None], 3, 2)),
}


@pytest.mark.parametrize("kind", IMAGE_FILES)
def test_an_image_of_any_bit_depth_reads_as_the_8_bit_rgb_it_stands_for(rgb8, tmp_path, kind):
    write, expected = IMAGE_FILES[kind]
    write(tmp_path / "image.png", rgb8)
    [path] = tmp_path.iterdir()
    np.testing.assert_array_equal(read_input_image(path), expected(rgb8))


def test_a_16_bit_gray_image_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 128, 257, 32767, 65280, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # PIL's own conversion clips
    np.testing.assert_array_equal(read_input_image(path)[0, :, 0], [0, 0, 1, 127, 254, 255])


def _palette_image() -> Image.Image:
    """A 4x4 palette image of indices 0..15, each a gray of its own."""
    image = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "P")
    image.putpalette([level * 16 for level in range(16) for _ in range(3)])
    return image


@pytest.mark.parametrize(("write", "mode", "first"), [
    (lambda path: Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.eye(4, dtype=np.uint8) * 255])).save(path),
     "RGBA", "row 0, column 1"),
    (lambda path: Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 128, np.uint8)]), "LA").save(path),
     "LA", "row 0, column 0"),
    (lambda path: _palette_image().save(path, transparency=5), "P with a transparent colour", "row 1, column 1"),
], ids=["rgba", "la", "palette-transparency"])
def test_an_image_with_transparent_pixels_is_refused_naming_file_mode_and_pixel(tmp_path, write, mode, first):
    path = tmp_path / "image.png"
    write(path)
    with pytest.raises(InputError, match=rf"^{path}: image mode {mode} with transparent pixels \(\d+, the first at "
                                         rf"{first}\); what lies under them is not in the image"):
        read_input_image(path)


@pytest.mark.parametrize(("array", "mode"), [(np.full((4, 4), 70000, np.int32), "I"),
                                             (np.full((4, 4), 0.5, np.float32), "F")], ids=["int32", "float"])
def test_an_image_of_an_unsupported_mode_is_refused_by_predict_before_any_work(model_record, tmp_path, capsys,
                                                                               array, mode):
    path = tmp_path / "slide.tif"
    Image.fromarray(array).save(path)
    torch.save(model_record, tmp_path / "model.pt")
    message = cli_error(["predict", "--model", str(tmp_path / "model.pt"), "--input", str(tmp_path), "--out",
                         str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert message == (f"pathmamba predict: {path}: image mode {mode}; predict reads 8-bit RGB, gray (L) or palette "
                       "(P) images, 16-bit gray, and RGBA or LA without transparency")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "slide.tif"]


def test_predict_gives_a_16_bit_image_the_masks_of_its_8_bit_version(model_record, rgb8, tmp_path):
    torch.save(model_record, tmp_path / "model.pt")
    (tmp_path / "in8").mkdir()
    (tmp_path / "in16").mkdir()
    Image.fromarray(_gray(rgb8)).save(tmp_path / "in8" / "a.png")
    Image.fromarray(_gray(rgb8).astype(np.uint16) * 257).save(tmp_path / "in16" / "a.png")
    _png_16bit_rgb(tmp_path / "in16" / "b.png", rgb8.astype(np.uint16) * 257)
    Image.fromarray(rgb8).save(tmp_path / "in8" / "b.png")
    rows = {}
    for name in ("in8", "in16"):
        rows[name] = predict(tmp_path / "model.pt", tmp_path / name, tmp_path / f"out-{name}", device="cpu")
    assert rows["in8"] == rows["in16"]
    for image in ("a.png", "b.png"):
        for folder in ("masks", "overlays"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out-in8" / folder / image)),
                                          np.asarray(Image.open(tmp_path / "out-in16" / folder / image)))


def test_calibrate_refuses_an_hparams_mistake_before_building_a_model(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(VALID_YAML.replace("width: 8", "widht: 8"))
    message = cli_error(_calibrate(config, tmp_path / "throughput.json"), capsys)
    assert message.startswith(f"pathmamba calibrate: {config}: methods.cam.hparams.widht: cam has no such keyword; "
                              "did you mean 'width'?")
    assert not (tmp_path / "throughput.json").exists()


def test_doctor_reports_an_hparams_mistake_in_its_config_row_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(VALID_YAML.replace("width: 8", "width: '8'"))
    capsys.readouterr()
    assert cli_main(["doctor", "--configfile", str(config)]) == 1
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["config"].startswith("| config | FAIL | invalid config:   methods.cam.hparams.width: '8' is not of "
                                     "type int |")
    assert rows["free disk"].startswith("| free disk | n/a | not sized: ")


# --- a diverged run trained before the engine stopped them is in no table (item 1) ----------------------


def test_tables_leave_out_a_run_whose_history_shows_a_diverged_loss(tmp_path):
    from test_tables import scores_of, write_run

    experiment_dir = tmp_path / "results" / "r"
    for seed, value, losses in ((0, 0.5, "0.9,0.7"), (1, 0.132, "nan,nan"), (2, 0.6, "0.8,inf")):
        folder = write_run(experiment_dir, "luad-histoseg", "cam", seed, scores_of(value))
        (folder / "history.csv").write_text("epoch,loss\n" + "".join(f"{epoch},{loss}\n" for epoch, loss in
                                                                     enumerate(losses.split(","), 1)))
    write_run(experiment_dir, "luad-histoseg", "trivial", None, scores_of(0.2))
    grid = Grid(["luad-histoseg"], ["cam"], [0, 1, 2])
    assert finished_runs(experiment_dir, grid)["method"].tolist() == ["cam", "trivial"]
    tables = write_tables(experiment_dir, grid, REPO / "config" / "paper_results.yaml", tmp_path / "tables", n_resamples=100)
    cam = tables["table1"].query("method == 'cam' and metric == 'mIoU'").iloc[0]
    assert (cam["mean"], cam["n_seeds"]) == (0.5, 1)  # seed 0 alone: neither 0.132 nor inf's run
    markdown = (tmp_path / "tables" / "table1_comparison.md").read_text()
    assert "| cam | weak (image labels) | 1/3 (incomplete) | **0.500** | " in markdown and "0.132" not in markdown
    assert ("Not counted, their training diverged (a nan or infinite loss in history.csv): luad-histoseg cam seed 1; "
            "luad-histoseg cam seed 2.") in markdown


def test_plan_refuses_an_hparams_mistake_instead_of_planning_failing_jobs(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(VALID_YAML.replace("width: 8", "width: [8]"))
    message = cli_error(["plan", "--configfile", str(config)], capsys)
    assert message == f"pathmamba plan: {config}: methods.cam.hparams.width: [8] is not of type int"
