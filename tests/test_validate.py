"""Dataset validation: generated datasets pass; each kind of bad input is reported with its file path."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_error
from PIL import Image

from pathmamba.cli import main
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.data.validate import validate_dataset

SIZE = 32
LUAD = get_dataset_spec("synthetic-luad")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("validate")
    roots = {}
    for seed, name in enumerate(("synthetic-luad", "synthetic-bcss")):
        roots[name] = base / name
        make_synthetic_dataset(name, roots[name], n_train=6, n_val=3, n_test=3, size=SIZE, seed=seed)
    return roots


@pytest.fixture
def luad(generated, tmp_path) -> Path:
    """A fresh copy of the generated LUAD-style dataset, to be damaged by a test."""
    return Path(shutil.copytree(generated["synthetic-luad"], tmp_path / "luad"))


@pytest.mark.parametrize("name", ["synthetic-luad", "synthetic-bcss"])
def test_generated_datasets_are_valid(generated, name, caplog):
    caplog.set_level(logging.INFO, logger="pathmamba.data")
    report = validate_dataset(generated[name], get_dataset_spec(name), image_size=SIZE, workers=2)
    assert report.ok, report.summary()
    assert report.counts == {"training": 6, "val": 3, "test": 3}
    assert report.checked_files == 6 + 2 * 3 + 2 * 3
    assert report.summary().startswith(f"{name}: valid")
    assert f"{name}: images checked 12/12 (100%)" in caplog.text  # progress, in the job's log


def _first(root: Path, folder: str) -> Path:
    return min((root / folder).glob("*.png"))


def _truncate(root):
    path = _first(root, "training")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _text_file(root):
    path = root / "training" / "notes-[1 0 0 1].png"
    path.write_text("not an image\n")
    return path


def _wrong_size(root):
    path = _first(root, "training")
    Image.new("RGB", (40, 40), (200, 100, 150)).save(path)
    return path


def _mask_value_7(root):
    path = _first(root, "val/mask")
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 0] = 7
    Image.fromarray(mask).save(path)
    return path


def _mask_other_size(root):
    path = _first(root, "test/mask")
    Image.open(path).resize((16, 16), Image.NEAREST).save(path)
    return path


def _rename_label(label):
    def rename(root):
        source = _first(root, "training")
        target = source.with_name(source.name[: source.name.rfind("[")] + label + ".png")
        source.rename(target)
        return target

    return rename


def _no_brackets(root):
    source = _first(root, "training")
    return source.rename(source.with_name("1001-2300-27920.png"))


def _empty_split(root):
    for path in (root / "val" / "img").glob("*.png"):
        path.unlink()
    return root / "val" / "img"


def _missing_test_masks(root):
    shutil.rmtree(root / "test" / "mask")
    return root / "test" / "mask"


BAD_INPUTS = {
    "truncated-png": (_truncate, "unreadable image", "does not decode (image file is truncated"),
    "text-file-named-png": (_text_file, "unreadable image", "not an image file (PIL cannot identify it)"),
    "wrong-image-size": (_wrong_size, "image size", "image is 40x40 px; expected 32x32"),
    "mask-value-7": (_mask_value_7, "mask values", "mask value 7; expected class indices 0..4"),
    "mask-other-size": (_mask_other_size, "mask size", "mask is 16x16 px but its image"),
    "label-with-2": (_rename_label("[1 0 2 1]"), "label", "cannot read the image-level label (found '1021')"),
    "empty-label": (_rename_label("[]"), "label", "cannot read the image-level label (found '')"),
    "no-brackets": (_no_brackets, "label", "cannot read the image-level label (found no '[...]')"),
    "all-zero-label": (_rename_label("[0 0 0 0]"), "no positive label", "label [0, 0, 0, 0] has no tissue class"),
    "other-dataset-label-form": (_rename_label("[1101]"), "label form", "label not written as synthetic-luad"),
    "empty-split-folder": (_empty_split, "layout", "empty split folder: no *.png images"),
    "missing-test-mask": (_missing_test_masks, "layout", "missing folder; expected"),
}


@pytest.mark.parametrize("damage, kind, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_reported_with_its_path(luad, damage, kind, message):
    bad_path = damage(luad)
    report = validate_dataset(luad, LUAD, image_size=SIZE)
    assert not report.ok
    assert [(p.path, p.kind) for p in report.problems] == [(str(bad_path), kind)], report.summary()
    assert message in report.problems[0].message
    assert f"  {bad_path}: {message}" in report.summary()
    assert "INVALID" in report.summary() and f"1 {kind}" in report.summary()


def test_published_counts_are_checked_for_real_datasets(generated):
    spec = get_dataset_spec("luad-histoseg")
    report = validate_dataset(generated["synthetic-luad"], spec, image_size=SIZE)
    assert [p.kind for p in report.problems] == ["count"] * 3
    assert "training: 6 usable files, luad-histoseg has 16678 (-16672)" in report.problems[0].message

    warned = validate_dataset(generated["synthetic-luad"], spec, image_size=SIZE, counts="warn")
    assert warned.ok
    assert warned.warnings[2] == "test: 3 usable files, luad-histoseg has 307 (-304)"


def test_cli_writes_the_report_or_fails_with_a_summary(luad, tmp_path, capsys):
    out = tmp_path / "report" / "validation.json"
    argv = ["validate-dataset", "--dataset", "synthetic-luad", "--data-root", str(luad), "--out", str(out),
            "--image-size", str(SIZE)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["counts"] == {"training": 6, "val": 3, "test": 3}

    out.unlink()
    bad = _mask_value_7(luad)
    message = cli_error(argv, capsys)
    assert message.startswith("pathmamba validate-dataset: synthetic-luad: INVALID")
    assert f"{bad}: mask value 7" in message
    assert not out.exists()
