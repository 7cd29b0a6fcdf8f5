"""Datasets described as data: the description files' checks, label tables, any number of classes, and a
user's dataset (three classes, labels in a CSV table, its own palette and folders) through the workflow."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image

from baselines.cam.wsss_tissue import WSSSTissueClassifier
from baselines.unet import UNet
from pathmamba.data.readers import LabelError, index_dataset, read_mask
from pathmamba.data.specs import DescriptionError, dataset_names, get_dataset_spec, load_description
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.data.validate import validate_dataset
from pathmamba.engine.config import ConfigError, check_config

THREE = REPO / "config" / "datasets" / "synthetic-three.json"


def description(**changes) -> dict:
    """The example user's description with ``changes`` applied (a value None removes the key)."""
    content = json.loads(THREE.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    return content


def write(folder: Path, content) -> Path:
    path = folder / "my dataset.json"
    path.write_text(json.dumps(content))
    return path


def test_the_shipped_descriptions_are_the_published_datasets_and_the_demo():
    assert dataset_names() == ["bcss-wsss", "luad-histoseg", "synthetic-bcss", "synthetic-luad"]
    luad, bcss = get_dataset_spec("luad-histoseg"), get_dataset_spec("bcss-wsss")
    assert luad.classes == ("TE", "NEC", "LYM", "TAS") and bcss.classes == ("TUM", "STR", "LYM", "NEC")
    assert luad.counts == {"training": 16678, "val": 300, "test": 307}
    assert bcss.counts == {"training": 23422, "val": 3418, "test": 4986}
    assert luad.palette[-1] == bcss.palette[-1] == (255, 255, 255) and luad.background == 4
    assert luad.train_filename("436219-7159-48057", (1, 0, 0, 1)) == "436219-7159-48057-[1 0 0 1].png"
    assert bcss.train_filename("TCGA-A1-A0SK-DX1_xmin45749", (1, 1, 0, 1)) == "TCGA-A1-A0SK-DX1_xmin45749+0[1101].png"
    for name in ("synthetic-luad", "synthetic-bcss"):
        synthetic = get_dataset_spec(name)
        real = get_dataset_spec(synthetic.synthetic.imitates)
        assert (synthetic.classes, synthetic.palette, synthetic.labels, synthetic.folders) == (
            real.classes, real.palette, real.labels, real.folders)
        assert synthetic.white_glass == real.white_glass and synthetic.counts is None


def test_a_description_is_found_by_its_path(tmp_path):
    spec = get_dataset_spec(str(write(tmp_path, description())))
    assert spec.name == "synthetic-three" and spec.num_classes == 3 and spec.background == 3
    assert spec.labels.kind == "table" and spec.labels.table == "training_labels.csv"
    assert spec.palette == ((230, 25, 75), (60, 180, 75), (0, 130, 200), (240, 240, 240))
    with pytest.raises(KeyError, match=r"unknown dataset 'my-data'; shipped datasets: bcss-wsss, .*description file"):
        get_dataset_spec("my-data")


@pytest.mark.parametrize("changes, key, message", [
    ({"classes": [{"name": "tumour", "colour": [1, 2, 3]}]}, "classes", "expected a list of 2 to 255 classes"),
    ({"classes": [{"name": "a", "colour": [1, 2, 3]}, {"name": "a", "colour": [4, 5, 6]}]}, "classes[].name",
     "a given more than once"),
    ({"classes": [{"name": "a", "colour": [240, 240, 240]}, {"name": "b", "colour": [4, 5, 6]}]},
     "colours (classes and background)", "(240, 240, 240) given more than once"),
    ({"classes": [{"name": "a", "colour": [1, 2, 300]}, {"name": "b", "colour": [4, 5, 6]}]}, "classes[0].colour",
     "expected an RGB colour [R, G, B] of integers 0..255, got [1, 2, 300]"),
    ({"labels": {"from": "folder names"}}, "labels.from", "'folder names'; expected one of 'file name', 'table'"),
    ({"labels": {"from": "table"}}, "labels", "missing 'table'"),
    ({"labels": {"from": "table", "table": "../labels.csv"}}, "labels.table", "inside the dataset folder"),
    ({"labels": {"from": "file name", "file_name": "{stem}_{label}.png", "separator": ""}}, "labels.file_name",
     "then '[{label}].png'"),
    ({"folders": {"training": "a", "val": "a", "test": "t", "images": "i", "masks": "m"}}, "folders", "must differ"),
    ({"folders": {"training": "x/y", "val": "v", "test": "t", "images": "i", "masks": "m"}}, "folders.training",
     "one folder name, not a path"),
    ({"name": "My Data"}, "name", "lower-case letters"),
    ({"background": None}, "", "missing 'background'"),
    ({"colour": "red"}, "", "unknown key 'colour'"),
    ({"synthetic": {"stems": "tcga-xy", "textures": {"tumour": "tumour", "stroma": "stroma"}}},
     "synthetic.textures", "missing 'immune'"),
    ({"counts": {"training": 10, "val": 2, "test": 2}}, "synthetic", "no published counts or download"),
])
def test_a_bad_description_is_refused_naming_the_file_and_the_key(tmp_path, changes, key, message):
    path = write(tmp_path, description(**changes))
    with pytest.raises(DescriptionError) as raised:
        load_description(path)
    where = f"{path}: {key}: " if key else f"{path}: "
    assert str(raised.value).startswith(where), str(raised.value)
    assert message in str(raised.value)


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",')
    with pytest.raises(DescriptionError, match=r"broken\.json: not valid JSON"):
        load_description(path)
    with pytest.raises(DescriptionError, match=r"missing\.json: dataset description not found"):
        load_description(tmp_path / "missing.json")


def test_the_config_takes_a_users_dataset_by_its_description(tmp_path):
    path = write(tmp_path, description())
    synthetic = {"n_train": 8, "n_val": 2, "n_test": 2, "size": 32, "seed": 0}
    check_config({"datasets": {"synthetic-three": {"description": str(path), "synthetic": synthetic}}})
    with pytest.raises(ConfigError, match=r"datasets\.my-data: unknown dataset; shipped datasets: .*'description'"):
        check_config({"datasets": {"my-data": {"synthetic": synthetic}}})
    with pytest.raises(ConfigError, match=r"datasets.other.description: .* describes 'synthetic-three'; expected its "
                                          r"'name' to be 'other'"):
        check_config({"datasets": {"other": {"description": str(path), "synthetic": synthetic}}})
    bad = write(tmp_path, description(labels={"from": "table"}))
    with pytest.raises(ConfigError, match=r"datasets.synthetic-three.description: .*my dataset\.json: labels: missing"):
        check_config({"datasets": {"synthetic-three": {"description": str(bad), "synthetic": synthetic}}})


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("three") / "synthetic three"
    make_synthetic_dataset(str(THREE), root, n_train=9, n_val=3, n_test=3, size=32, seed=0)
    return root


def test_a_generated_dataset_is_laid_out_and_labelled_as_described(three):
    spec = get_dataset_spec(str(THREE))
    assert sorted(p.name for p in three.iterdir()) == ["testing", "train_patches", "training_labels.csv", "validation"]
    with open(three / "training_labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "tumour", "stroma", "immune"] and len(rows) == 9
    index = index_dataset(three, spec)
    assert {path.name: label for path, label in index.train} == {
        row["image"]: tuple(int(row[c]) for c in spec.classes) for row in rows}
    assert all(any(label) for _, label in index.train)
    seen = set()
    for _, mask_path in index.val + index.test:
        with Image.open(mask_path) as mask:
            assert mask.mode == "P" and mask.getpalette()[:12] == [v for rgb in spec.palette for v in rgb]
        seen |= set(np.unique(read_mask(mask_path, spec)).tolist())
    assert seen <= {0, 1, 2, 3} and {0, 1, 2} <= seen  # every class occurs; 3 is the background
    assert validate_dataset(three, spec, image_size=32).ok


def test_label_table_problems_are_each_reported_with_their_file(three, tmp_path):
    spec = get_dataset_spec(str(THREE))
    copy = Path(shutil.copytree(three, tmp_path / "copy"))
    table = copy / "training_labels.csv"
    lines = table.read_text().splitlines()
    first, second = lines[1].split(",")[0], lines[2].split(",")[0]
    lines[1] = f"{first},0,0,0"  # no positive class
    del lines[2]  # an image without a row
    lines.append("not-there.png,1,0,0")  # a row without its image
    table.write_text("\n".join(lines) + "\n")
    report = validate_dataset(copy, spec, image_size=32)
    problems = {(Path(p.path).name, p.kind) for p in report.problems}
    assert problems == {(first, "no positive label"), (second, "label"), ("training_labels.csv", "label table")}
    with pytest.raises(LabelError, match=rf"{second}: no row in the label table .*training_labels\.csv"):
        index_dataset(copy, spec)
    table.write_text("image,tumour,stroma\n")
    with pytest.raises(LabelError, match=r"training_labels\.csv: header image,tumour,stroma; expected the columns "
                                         r"image,tumour,stroma,immune"):
        index_dataset(copy, spec)


def test_two_classes_are_enough(tmp_path):
    two = description(name="two-classes", classes=[{"name": "tumour", "colour": [200, 0, 0]},
                                                    {"name": "other", "colour": [0, 0, 200]}],
                      labels={"from": "file name", "file_name": "{stem}[{label}].png", "separator": ""},
                      synthetic={"stems": "patient-x-y", "textures": {"tumour": "tumour", "other": "stroma"}})
    spec = get_dataset_spec(str(write(tmp_path, two)))
    make_synthetic_dataset(str(write(tmp_path, two)), tmp_path / "data", n_train=6, n_val=2, n_test=2, size=32)
    index = index_dataset(tmp_path / "data", spec)
    assert all(len(label) == 2 and any(label) for _, label in index.train)
    assert all(path.name.endswith(("[10].png", "[01].png", "[11].png")) for path, _ in index.train)
    assert validate_dataset(tmp_path / "data", spec, image_size=32).ok


def test_three_class_models_score_three_classes_and_ignore_index_3():
    spec = get_dataset_spec(str(THREE))
    torch.manual_seed(0)
    stage1 = WSSSTissueClassifier(num_classes=3, backbone="resnet18", width=8).eval()
    images = torch.ones(2, 3, 32, 32) * 2.2  # white glass after ImageNet normalisation
    images[..., 16:] = -0.5  # dark tissue on the right half
    masks = stage1.pseudo_masks(images, torch.tensor([[1.0, 0, 1], [0, 1, 0]]), spec)
    for mask in masks:
        assert bool((mask[..., :16] == spec.background).all()) and int(mask[..., 16:].max()) <= 2
    unet = UNet(num_classes=3, encoder="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
    targets = torch.full((2, 32, 32), spec.background)
    targets[:, :4, :4] = 1
    loss, _ = unet.loss(torch.randn(2, 3, 32, 32), targets)  # index 3 ignored, not a class out of range
    assert torch.isfinite(loss) and unet.predict(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


THREE_CLASS_RUN = {
    "experiment": "three",
    "seeds": [0],
    "datasets": {"synthetic-three": {"description": "descriptions/synthetic three.json",
                                     "synthetic": {"n_train": 16, "n_val": 4, "n_test": 6, "size": 64, "seed": 0}}},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
    "evaluate": {"n_masks": 2},
    "methods": {
        "cam": {"hparams": {"backbone": "resnet18", "width": 16, "pretrained": "none"}},
        "unet": {"hparams": {"encoder": "tu-resnet18", "encoder_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
                             "decoder_channels": [32, 16, 16, 8, 8], "pretrained": "none"}},
        "pathmamba": {"hparams": {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "d_state": 8, "ssm_ratio": 1.0,
                                    "decoder_dim": 32, "backbone": "resnet18", "backbone_width": 16,
                                    "pretrained": "none"}},
    },
}


@pytest.mark.e2e
def test_a_users_three_class_dataset_runs_through_the_workflow(tmp_path, snakemake_bin, workflow_env):
    """The user's description (a path with a space, relative to the working folder), generated data with
    labels in a CSV table, three methods trained for one epoch: Table 1, the paired statistics, figures and
    predictions with the description's three classes and palette."""
    (tmp_path / "descriptions").mkdir()
    shutil.copy(THREE, tmp_path / "descriptions" / "synthetic three.json")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(THREE_CLASS_RUN))
    command = [snakemake_bin, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(config_path), "--cores", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=workflow_env, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / "results" / "three"

    with open(results / "tables" / "table1_comparison.csv") as handle:
        table1 = {(row["method"], row["metric"]): row for row in csv.DictReader(handle)}
    assert {method for method, _ in table1} == {"cam", "unet", "pathmamba", "trivial"}
    for row in table1.values():
        assert row["dataset"] == "synthetic-three" and row["status"] == "complete", row
        assert 0.0 <= float(row["mean"]) <= 1.0
    print((results / "tables" / "table1_comparison.md").read_text())
    per_class = (results / "tables" / "per_class_iou.md").read_text()
    assert "| Method | tumour | stroma | immune |" in per_class
    with open(results / "tables" / "statistics.csv") as handle:
        statistics = list(csv.DictReader(handle))
    assert {(row["dataset"], row["reference"], row["other"]) for row in statistics} == {
        ("synthetic-three", "pathmamba", other) for other in ("cam", "unet", "trivial")}
    assert all(int(row["n_images"]) == 6 for row in statistics)
    for name in ("qualitative_synthetic-three", "heatmaps_synthetic-three", "confusion_synthetic-three",
                 "per_class_iou", "miou_over_seeds"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000

    run = results / "runs" / "synthetic-three" / "pathmamba" / "seed0"
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["classes"] == ["tumour", "stroma", "immune"]
    assert len(metrics["protocols"]["ignore_background"]["confusion"]) == 3
    assert len(metrics["protocols"]["with_background"]["confusion"]) == 4
    with open(run / "per_image.csv") as handle:
        header = next(csv.reader(handle))
    assert "cm_t2_p2" in header and "cm_t3_p3" not in header
    for mask_path in sorted((run / "masks").glob("*.png")):
        with Image.open(mask_path) as mask:
            assert mask.getpalette()[:12] == [230, 25, 75, 60, 180, 75, 0, 130, 200, 240, 240, 240]
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}

    # The model file carries its dataset's description: predict needs neither the file nor the config.
    (tmp_path / "descriptions" / "synthetic three.json").unlink()
    images = tmp_path / "resources" / "datasets" / "synthetic-three" / "testing" / "images"
    predicted = subprocess.run(
        ["python", "-m", "pathmamba", "predict", "--model", str(run / "model.pt"), "--input", str(images),
         "--out", str(tmp_path / "predicted"), "--device", "cpu"],
        capture_output=True, text=True, env=workflow_env, cwd=tmp_path, timeout=600, check=False)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with open(tmp_path / "predicted" / "classes.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {"share_tumour", "share_stroma", "share_immune"} <= set(rows[0])
    assert all(abs(sum(float(row[f"share_{c}"]) for c in ("tumour", "stroma", "immune")) - 1) < 1e-5 for row in rows)
