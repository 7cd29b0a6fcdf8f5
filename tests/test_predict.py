"""`predict` (tiled segmentation of new images) and `export` (safetensors + model card) for every method;
the version and progress lines that go with them."""

import csv
import itertools
import json
import logging
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image

from pathmamba.cli import main as cli_main
from pathmamba.core.errors import FileSafetyError, InputError
from pathmamba.core.settings import TrainSettings
from pathmamba.core.torch_files import atomic_torch_save
from pathmamba.data.datasets import to_tensor
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import evaluate
from pathmamba.engine.export import CARD, WEIGHTS, export_model, load_export
from pathmamba.engine.predict import predict, ramp, segment, tile_starts
from pathmamba.engine.registry import build_method, method_names

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["methods"]
SIZE = 64  # the demo's training size
LARGE = (3 * SIZE + 5, 3 * SIZE - 13)  # (height, width): about 3x the training size, not a multiple of it
CPU = torch.device("cpu")


def demo_hparams(method: str) -> dict:
    """The demo config's hparams of ``method``, a two-stage one's first-stage hparams included as training
    passes them."""
    hparams = dict(DEMO[method].get("hparams", {}))
    if "stage1" in DEMO[method]:
        hparams["stage1_hparams"] = DEMO[method]["stage1"]["hparams"]
    return hparams


def write_model(method: str, path: Path, input_size: list[int] | None = (SIZE, SIZE)) -> torch.nn.Module:
    """A ``model.pt`` as training writes it, of ``method`` at its demo size with random weights."""
    torch.manual_seed(0)
    model = build_method(method, num_classes=4, **demo_hparams(method)).eval()
    record = {"method": method, "stage": None, "hparams": demo_hparams(method), "dataset": "synthetic-luad",
              "seed": 0, "settings": asdict(TrainSettings(device="cpu")), "epoch": 1, "val_mIoU": 0.5,
              "state_dict": model.state_dict()}
    if input_size:
        record["input_size"] = list(input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(record, path)
    return model


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (structure for the models to respond to), saved to ``path``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two training-size PNGs and one large TIFF."""
    folder = tmp_path_factory.mktemp("images")
    write_image(folder / "a.png", SIZE, SIZE, seed=1)
    write_image(folder / "b.png", SIZE, SIZE, seed=2)
    write_image(folder / "region.tif", *LARGE, seed=3)
    return folder


def test_tiles_cover_the_image_with_the_requested_overlap():
    for length, tile, overlap in [(64, 64, 16), (197, 64, 16), (1000, 224, 56), (65, 64, 0)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(tile - (b - a) >= overlap for a, b in itertools.pairwise(starts))
    assert tile_starts(40, 64, 16) == [0]
    window = ramp(64, 16)
    assert window.min() > 0 and window.max() == 1 and torch.equal(window, window.flip(0))


class Pointwise(torch.nn.Module):
    """A "model" whose score at a pixel depends on that pixel only: stitching must reproduce it exactly."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images, images.sum(1, keepdim=True)], dim=1)


def test_stitched_tiles_equal_the_whole_image_scores(images):
    path = images / "region.tif"
    (canvas, scores, mask), = segment(Pointwise(), [path], (SIZE, SIZE), CPU, batch_size=5)
    whole = Pointwise().predict(to_tensor(np.asarray(Image.open(path).convert("RGB")))[None])[0]
    assert scores.shape == (4, *LARGE) and len(canvas.tiles) == 16
    torch.testing.assert_close(scores, whole)
    assert torch.equal(mask, whole.argmax(0))


@pytest.mark.parametrize("method", method_names())
def test_every_method_predicts_a_folder_with_a_large_image(method, images, tmp_path, one_torch_thread):
    model = write_model(method, tmp_path / "run" / "model.pt")
    rows = predict(tmp_path / "run" / "model.pt", images, tmp_path / "out", device="cpu", batch_size=4)

    assert [row["image"] for row in rows] == ["a.png", "b.png", "region.tif"]
    assert [row["tiles"] for row in rows] == [1, 1, 16]
    for row in rows:
        size = (row["height"], row["width"])
        with Image.open(tmp_path / "out" / "masks" / f"{Path(row['image']).stem}.png") as mask:
            assert mask.mode == "P" and mask.size[::-1] == size
            assert mask.getpalette()[:15] == [v for rgb in get_dataset_spec("luad-histoseg").palette for v in rgb]
            assert np.asarray(mask).max() <= 3
        with Image.open(tmp_path / "out" / "overlays" / f"{Path(row['image']).stem}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size[::-1] == size
    assert (rows[2]["height"], rows[2]["width"]) == LARGE
    with open(tmp_path / "out" / "classes.csv") as handle:
        table = list(csv.DictReader(handle))
    shares = [sum(float(value) for key, value in row.items() if key.startswith("share_")) for row in table]
    assert shares == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    record = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert record["method"] == method and record["tile"] == {"height": SIZE, "width": SIZE}

    # A training-size image is one tile: the same scores as the model's own prediction of it.
    image = np.asarray(Image.open(images / "a.png").convert("RGB"))
    (_, scores, mask), = segment(model, [images / "a.png"], (SIZE, SIZE), CPU)
    with torch.no_grad():
        direct = model.predict(to_tensor(image)[None])[0].float()
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, direct.argmax(0))


@pytest.mark.parametrize("method", method_names())
def test_export_round_trips_every_method(method, images, tmp_path, one_torch_thread):
    model = write_model(method, tmp_path / "run" / "model.pt")
    card = export_model(tmp_path / "run" / "model.pt", tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [WEIGHTS, CARD]
    assert card["method"] == method and card["classes"] == ["TE", "NEC", "LYM", "TAS"]
    assert card["input"]["size"] == {"height": SIZE, "width": SIZE}
    record, loaded = load_export(tmp_path / "export")
    assert record["input_size"] == [SIZE, SIZE]
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in expected.items())


def test_export_card_and_predict_from_it_through_the_cli(images, tmp_path, capsys):
    write_model("cam", tmp_path / "run" / "model.pt")
    (tmp_path / "run" / "test_metrics.json").write_text(json.dumps({"protocols": {"ignore_background": {"mIoU": 0.5}}}))
    assert cli_main(["export", "--model", str(tmp_path / "run" / "model.pt"), "--out", str(tmp_path / "export")]) == 0
    card = json.loads((tmp_path / "export" / CARD).read_text())
    assert card["test_metrics"] == {"ignore_background": {"mIoU": 0.5}}
    assert card["palette"][4] == {"index": 4, "name": "background", "rgb": [255, 255, 255]}
    assert card["input"]["mean"] == [0.485, 0.456, 0.406] and card["seed"] == 0
    assert card["exported_with"]["pathmamba_version"] == metadata.version("pathmamba-benchmark")
    assert cli_main(["predict", "--model", str(tmp_path / "export"), "--input", str(images / "a.png"),
                     "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    from_pt = predict(tmp_path / "run" / "model.pt", images / "a.png", tmp_path / "pred-pt", device="cpu")
    assert (tmp_path / "pred" / "masks" / "a.png").read_bytes() == (tmp_path / "pred-pt" / "masks" / "a.png").read_bytes()
    assert from_pt[0]["tiles"] == 1

    # A damaged weights file is refused, naming it.
    (tmp_path / "export" / WEIGHTS).write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match=WEIGHTS):
        load_export(tmp_path / "export")


def test_out_folder_of_others_is_refused_and_an_earlier_prediction_replaced(images, tmp_path):
    write_model("cam", tmp_path / "run" / "model.pt")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileSafetyError, match=r"no predict\.json"):
        predict(tmp_path / "run" / "model.pt", images / "a.png", foreign, device="cpu")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(FileSafetyError, match=r"not .*export folder"):
        export_model(tmp_path / "run" / "model.pt", foreign)

    out = tmp_path / "out"
    predict(tmp_path / "run" / "model.pt", images, out, device="cpu")
    predict(tmp_path / "run" / "model.pt", images / "b.png", out, device="cpu")  # ours: replaced
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_bad_inputs_are_one_line_errors(images, tmp_path):
    write_model("cam", tmp_path / "old" / "model.pt", input_size=None)
    with pytest.raises(InputError, match="--tile-size"):
        predict(tmp_path / "old" / "model.pt", images, tmp_path / "out", device="cpu")
    rows = predict(tmp_path / "old" / "model.pt", images / "region.tif", tmp_path / "out", device="cpu", tile_size=SIZE)
    assert rows[0]["tiles"] == 16
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        predict(tmp_path / "old" / "model.pt", tmp_path / "empty", tmp_path / "out2", device="cpu")
    with pytest.raises(FileNotFoundError, match="--model"):
        predict(tmp_path / "missing.pt", images, tmp_path / "out2", device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"x\.png"):
        predict(tmp_path / "old" / "model.pt", tmp_path / "broken", tmp_path / "out2", device="cpu")
    assert not (tmp_path / "out2").exists()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pathmamba {metadata.version('pathmamba-benchmark')}"


def test_training_records_size_and_version_and_logs_progress(tmp_path, monkeypatch, caplog, one_torch_thread):
    """A tiny real run: model.pt records the training size, run.json the version; training and evaluation
    log their progress (PROGRESS_SECONDS lowered so that a short epoch logs too)."""
    from pathmamba.engine import train as train_module

    root = tmp_path / "data"
    make_synthetic_dataset("synthetic-luad", root, n_train=16, n_val=4, n_test=4, size=32, seed=0)
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)
    settings = TrainSettings(epochs=2, batch_size=4, device="cpu")
    with caplog.at_level(logging.INFO):
        record = train_module.train("cam", "synthetic-luad", root, tmp_path / "run", tmp_path / "ck", 0,
                                    {"backbone": "resnet18", "width": 8}, settings)
        evaluate(tmp_path / "run" / "model.pt", root, tmp_path / "run", device="cpu")
    assert record["pathmamba_version"] == metadata.version("pathmamba-benchmark")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pathmamba_version"] == record["pathmamba_version"]
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["input_size"] == [32, 32]
    messages = [r.getMessage() for r in caplog.records]
    assert any("epoch 2/2 step 2/4" in m and "img/s" in m and "epoch ETA" in m and "run ETA" in m for m in messages)
    assert any(m.startswith("test images 4/4 (100%)") for m in messages)
    card = export_model(tmp_path / "run" / "model.pt", tmp_path / "export")
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["protocols"]
    assert json.dumps(card["test_metrics"]) == json.dumps(metrics)  # as text: nan (a class absent) equals nan
    assert card["trained_with"]["git_commit"] == record["environment"]["git_commit"]
