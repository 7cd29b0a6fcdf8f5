"""Readers of the published formats: labels in file names, images, masks, dataset layout tolerances."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathmamba.data.readers import (
    DatasetLayoutError,
    LabelError,
    MaskError,
    index_dataset,
    parse_label,
    read_image,
    read_mask,
)
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset

LUAD = get_dataset_spec("synthetic-luad")
BCSS = get_dataset_spec("synthetic-bcss")
REAL_LUAD = get_dataset_spec("luad-histoseg")
REAL_BCSS = get_dataset_spec("bcss-wsss")


@pytest.fixture(scope="module")
def canonical(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readers") / "luad"
    make_synthetic_dataset("synthetic-luad", root, n_train=6, n_val=4, n_test=4, size=32, seed=0)
    return root


@pytest.fixture
def copy(canonical, tmp_path):
    """A fresh copy of the canonical dataset at tmp_path / relative, to be altered by a test."""

    def make(relative: str = "luad") -> Path:
        return Path(shutil.copytree(canonical, tmp_path / relative))

    return make


def _relative(index):
    """The index with paths relative to its root, to compare indexes of different folders."""
    return (
        [(p.relative_to(index.root).as_posix(), label) for p, label in index.train],
        [(i.relative_to(index.root).as_posix(), m.relative_to(index.root).as_posix()) for i, m in index.val],
        [(i.relative_to(index.root).as_posix(), m.relative_to(index.root).as_posix()) for i, m in index.test],
    )


def _save_mask(path: Path, mask: np.ndarray, spec, mode: str) -> None:
    if mode == "RGB":
        Image.fromarray(np.array(spec.palette, dtype=np.uint8)[mask]).save(path)
        return
    image = Image.fromarray(mask)
    if mode == "P":
        image.putpalette(spec.flat_palette)
    image.save(path)


# --- labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec, label",
    [
        ("1031280-2300-27920-[1 0 0 1].png", REAL_LUAD, (1, 0, 0, 1)),
        ("1031280-2300-27920-[0 1 1 0].png", LUAD, (0, 1, 1, 0)),
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", REAL_BCSS, (1, 1, 0, 1)),
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+12[0010].png", BCSS, (0, 0, 1, 0)),
        ("/data/run[3]/1031280-2300-27920-[0 0 0 1].png", REAL_LUAD, (0, 0, 0, 1)),  # only the file name
        ("x[2]-[1 1 1 1].png", REAL_LUAD, (1, 1, 1, 1)),  # the last '[' counts
    ],
)
def test_parse_label_reads_both_name_patterns(name, spec, label):
    assert parse_label(name, spec) == label
    assert parse_label(Path(name), spec) == label


@pytest.mark.parametrize(
    "name",
    [
        "1031280-2300-27920-[1 0 2 1].png",
        "1031280-2300-27920-[].png",
        "1031280-2300-27920.png",
        "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[101].png",
        "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[11011].png",
        "1031280-2300-27920-[1 0 0 1.png",
        "1031280-2300-27920-[1 0 0 1]-[x].png",
    ],
)
def test_parse_label_rejects_bad_names_naming_the_file(name):
    with pytest.raises(LabelError) as error:
        parse_label(Path("/data/training") / name, REAL_LUAD)
    message = str(error.value)
    assert name in message
    assert "expected 4 digits of 0/1 between the last '[' and ']'" in message
    assert isinstance(error.value, ValueError)


# --- images and masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_read_image_gives_rgb_uint8(tmp_path, mode):
    path = tmp_path / "image.png"
    Image.new(mode, (5, 3), 200 if mode == "L" else (10, 20, 30, 255)[: len(mode)]).save(path)
    image = read_image(path)
    assert image.shape == (3, 5, 3)
    assert image.dtype == np.uint8
    assert tuple(image[0, 0]) == ((200, 200, 200) if mode == "L" else (10, 20, 30))


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_read_mask_gives_class_indices_for_every_mode(tmp_path, mode):
    mask = np.random.default_rng(0).integers(0, 5, (6, 7)).astype(np.uint8)
    path = tmp_path / "mask.png"
    _save_mask(path, mask, REAL_BCSS, mode)
    read = read_mask(path, REAL_BCSS)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, mask)


def test_read_mask_rejects_a_colour_outside_the_palette(tmp_path):
    rgb = np.array(REAL_LUAD.palette, dtype=np.uint8)[np.zeros((4, 4), dtype=np.uint8)]
    rgb[2, 3] = (1, 2, 3)
    path = tmp_path / "bad-colour.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(MaskError, match=r"bad-colour\.png.*\(1, 2, 3\).*row 2, column 3"):
        read_mask(path, REAL_LUAD)


def test_read_mask_rejects_indices_above_4_and_other_modes(tmp_path):
    path = tmp_path / "index7.png"
    _save_mask(path, np.full((3, 3), 7, dtype=np.uint8), REAL_LUAD, "P")
    with pytest.raises(MaskError, match=r"index7\.png: mask value 7 .* colour \(0, 0, 0\), not in the luad"):
        read_mask(path, REAL_LUAD)
    path = tmp_path / "float.tif"
    Image.new("F", (3, 3)).save(path)
    with pytest.raises(MaskError, match=r"float\.tif.*mode F"):
        read_mask(path, REAL_LUAD)


# --- dataset index ----------------------------------------------------------------------------------


def test_index_of_the_canonical_layout(canonical):
    index = index_dataset(canonical, LUAD)
    assert index.root == canonical
    assert index.spec is LUAD
    assert index.tolerated == []
    assert [len(index.train), len(index.val), len(index.test)] == [6, 4, 4]
    names = [p.name for p, _ in index.train]
    assert names == sorted(names)
    assert all(label == parse_label(p, LUAD) and sum(label) >= 1 for p, label in index.train)
    for split in (index.val, index.test):
        assert [i.name for i, _ in split] == sorted(i.name for i, _ in split)
        assert all(i.name == m.name and i.parent.name == "img" and m.parent.name == "mask" for i, m in split)


def test_nested_top_folder_is_tolerated(canonical, copy):
    nested = copy("LUAD-HistoSeg/LUAD-HistoSeg")
    (nested.parent / "__MACOSX").mkdir()  # zip artefact beside the real folder
    (nested.parent / "readme.txt").write_text("files beside the folder do not matter")
    index = index_dataset(nested.parent, LUAD)
    assert index.root == nested
    assert _relative(index) == _relative(index_dataset(canonical, LUAD))
    assert len(index.tolerated) == 1 and "nested" in index.tolerated[0]


def test_train_folder_alias_is_tolerated(canonical, copy):
    root = copy()
    (root / "training").rename(root / "train")
    index = index_dataset(root, LUAD)
    canonical_train, *canonical_eval = _relative(index_dataset(canonical, LUAD))
    train, *evaluation = _relative(index)
    assert [(p.replace("train/", "training/", 1), label) for p, label in train] == canonical_train
    assert evaluation == canonical_eval
    assert len(index.tolerated) == 1 and "train/" in index.tolerated[0]


def test_rgb_masks_are_tolerated_and_read_as_indices(canonical, copy):
    root = copy()
    for mask_path in sorted((root / "val" / "mask").glob("*.png")):
        _save_mask(mask_path, read_mask(mask_path, LUAD), LUAD, "RGB")
    index = index_dataset(root, LUAD)
    assert _relative(index) == _relative(index_dataset(canonical, LUAD))
    assert index.tolerated == ["val: 4 of 4 masks are RGB, not P mode; read through the palette"]
    for (_, original), (_, converted) in zip(index_dataset(canonical, LUAD).val, index.val, strict=True):
        np.testing.assert_array_equal(read_mask(converted, LUAD), read_mask(original, LUAD))


def test_image_without_mask_is_skipped_and_noted(canonical, copy):
    root = copy()
    extra = root / "test" / "img" / "0000000-0-0.png"
    shutil.copy(next((root / "test" / "img").iterdir()), extra)
    index = index_dataset(root, LUAD)
    assert _relative(index) == _relative(index_dataset(canonical, LUAD))
    assert len(index.tolerated) == 1
    assert "test" in index.tolerated[0] and extra.name in index.tolerated[0]


def test_missing_or_empty_splits_are_layout_errors(copy, tmp_path):
    expected = r"<root>/training/\*\.png, <root>/\{val,test\}/\{img,mask\}/\*\.png"

    root = copy("no-val")
    shutil.rmtree(root / "val" / "mask")
    with pytest.raises(DatasetLayoutError, match=rf"no-val/val/mask: missing folder; expected {expected}"):
        index_dataset(root, LUAD)

    root = copy("empty-training")
    for path in (root / "training").iterdir():
        path.unlink()
    with pytest.raises(DatasetLayoutError, match=rf"empty-training/training: no \*\.png.*{expected}"):
        index_dataset(root, LUAD)

    root = copy("no-pairs")
    for path in (root / "test" / "mask").iterdir():
        path.unlink()
    with pytest.raises(DatasetLayoutError, match=rf"no-pairs/test: no image with a mask.*{expected}"):
        index_dataset(root, LUAD)

    two = tmp_path / "two-folders"
    (two / "a").mkdir(parents=True)
    (two / "b").mkdir()
    with pytest.raises(DatasetLayoutError, match=rf"two-folders/training: no training folder.*{expected}"):
        index_dataset(two, LUAD)

    with pytest.raises(DatasetLayoutError, match=rf"absent: dataset folder not found; expected {expected}"):
        index_dataset(tmp_path / "absent", LUAD)


def test_bad_training_file_name_is_a_label_error(copy):
    root = copy()
    first = next((root / "training").iterdir())
    first.rename(first.with_name("1031280-1-1-[1 1].png"))
    with pytest.raises(LabelError, match=r"1031280-1-1-\[1 1\]\.png"):
        index_dataset(root, LUAD)
