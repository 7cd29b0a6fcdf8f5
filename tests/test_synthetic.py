"""Synthetic demo datasets: published layout and names, P-mode masks, labels, determinism (the same
pixels as before datasets became description files), atomicity."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import IGNORE_INDEX, file_bytes
from PIL import Image

from pathmamba.data import synthetic
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import generate_patches, label_from_mask, make_synthetic_dataset

SIZE = 48
COUNTS = {"training": 10, "val": 5, "test": 4}
LUAD_STEM = r"\d{7}-\d+-\d+"
BCSS_STEM = r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-DX1_xmin\d+_ymin\d+_MPP-0\.2500"
TRAIN_NAME = {
    "synthetic-luad": re.compile(rf"^{LUAD_STEM}-\[[01] [01] [01] [01]\]\.png$"),
    "synthetic-bcss": re.compile(rf"^{BCSS_STEM}\+0\[[01]{{4}}\]\.png$"),
}
EVAL_NAME = {
    "synthetic-luad": re.compile(rf"^{LUAD_STEM}\.png$"),
    "synthetic-bcss": re.compile(rf"^{BCSS_STEM}\.png$"),
}
NAMES = sorted(TRAIN_NAME)


def _make(root: Path, name: str, seed: int = 0) -> Path:
    out = root / name
    make_synthetic_dataset(name, out, COUNTS["training"], COUNTS["val"], COUNTS["test"], size=SIZE, seed=seed)
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {name: _make(root, name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_layout_and_file_names_are_as_published(datasets, name):
    root = datasets[name]
    assert sorted(p.name for p in root.iterdir()) == ["test", "training", "val"]
    training = list((root / "training").iterdir())
    assert len(training) == COUNTS["training"]
    assert all(TRAIN_NAME[name].match(p.name) for p in training), [p.name for p in training]
    for split in ("val", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == ["img", "mask"]
        images = sorted(p.name for p in (root / split / "img").iterdir())
        masks = sorted(p.name for p in (root / split / "mask").iterdir())
        assert len(images) == COUNTS[split]
        assert images == masks
        assert all(EVAL_NAME[name].match(n) for n in images), images
    # The temporary build folder was renamed, not left beside the dataset.
    assert sorted(p.name for p in root.parent.iterdir()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_images_are_rgb_and_masks_p_mode_with_the_palette(datasets, name):
    root, spec = datasets[name], get_dataset_spec(name)
    for image_path in sorted(root.rglob("*.png")):
        with Image.open(image_path) as image:
            assert image.size == (SIZE, SIZE)
            if image_path.parent.name == "mask":
                assert image.mode == "P"
                assert image.getpalette()[:15] == spec.flat_palette[:15]
                assert set(np.unique(np.asarray(image))) <= set(range(IGNORE_INDEX + 1))
            else:
                assert image.mode == "RGB"


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_classes_present_and_files_hold_the_generated_patches(datasets, name):
    root, spec = datasets[name], get_dataset_spec(name)
    for stem, image, mask in generate_patches(spec, "training", COUNTS["training"], SIZE, seed=0):
        present = set(np.unique(mask).tolist()) - {IGNORE_INDEX}
        label = label_from_mask(mask, spec.num_classes)
        assert label == tuple(int(c in present) for c in range(4))
        assert sum(label) >= 1
        path = root / "training" / spec.train_filename(stem, label)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    for stem, image, mask in generate_patches(spec, "val", COUNTS["val"], SIZE, seed=0):
        np.testing.assert_array_equal(np.asarray(Image.open(root / "val" / "mask" / f"{stem}.png")), mask)
        np.testing.assert_array_equal(np.asarray(Image.open(root / "val" / "img" / f"{stem}.png")), image)


def test_label_from_mask_ignores_background_and_tiny_regions():
    mask = np.full((10, 10), IGNORE_INDEX, dtype=np.uint8)
    mask[:5] = 2  # 50%
    mask[9, :3] = 0  # 3%: counts
    mask[9, 3:5] = 1  # 2%: too small
    assert label_from_mask(mask, 4) == (1, 0, 1, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_every_class_occurs_in_every_split_however_small(n):
    for split in ("training", "val", "test"):
        classes = set()
        for _, _, mask in generate_patches(get_dataset_spec("synthetic-bcss"), split, n, 32, seed=3):
            classes |= {c for c, v in enumerate(label_from_mask(mask, 4)) if v}
        assert classes == {0, 1, 2, 3}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, datasets):
    again = file_bytes(_make(tmp_path / "again", "synthetic-luad", seed=0))
    assert again == file_bytes(datasets["synthetic-luad"])
    other = file_bytes(_make(tmp_path / "other", "synthetic-luad", seed=1))
    assert set(other) != set(again)
    assert sorted(other.values()) != sorted(again.values())


#: The pixels (names, modes, palettes, decoded values) of small demo datasets as the generator wrote them
#: before the datasets became description files (commit 9ae03d2): the demo's data, and so its numbers, did
#: not change with them. Decoded pixels, not file bytes: PNG compression may differ between zlib builds.
DEMO_PIXELS = {"synthetic-luad": "a59349f6c5abfee56949970d5183dac289bafe0eace140bd6444be2739867ccb",
               "synthetic-bcss": "f0b8408bb624adf2fede19f54a746dd91205277de64fb8fcedcf16e8bee67aa3"}


@pytest.mark.parametrize("name, seed", [("synthetic-luad", 0), ("synthetic-bcss", 1)])
def test_the_demo_datasets_are_the_pixels_they_always_were(tmp_path, name, seed):
    root = tmp_path / "data"
    make_synthetic_dataset(name, root, n_train=12, n_val=4, n_test=4, size=48, seed=seed)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            digest.update(f"{path.relative_to(root).as_posix()}\0{image.mode}\0{image.getpalette()}\0".encode())
            digest.update(np.asarray(image).tobytes())
    assert digest.hexdigest() == DEMO_PIXELS[name]


def test_class_textures_differ_in_colour_and_background_is_near_white():
    spec = get_dataset_spec("synthetic-luad")  # TE, NEC, LYM, TAS
    pixels: dict[int, list[np.ndarray]] = {c: [] for c in range(5)}
    for _, image, mask in generate_patches(spec, "val", 40, 64, seed=0):
        for c in range(5):
            pixels[c].append(image[mask == c].astype(float))
    mean = {c: np.concatenate(p).mean(axis=0) for c, p in pixels.items()}
    assert (mean[IGNORE_INDEX] > 235).all()
    brightness = {c: mean[c].mean() for c in range(4)}
    assert min(brightness, key=brightness.get) == 2  # lymphocytes: densest dark nuclei
    assert max(brightness, key=brightness.get) == 1  # necrosis: pale
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(mean[a] - mean[b]).max() > 8, (a, b, mean[a], mean[b])


def test_a_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        yield from []
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate_patches", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic_dataset("synthetic-luad", tmp_path / "demo", 2, 2, 2, size=32)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        make_synthetic_dataset("synthetic-luad", tmp_path / "a", 2, 0, 2, size=32)
    with pytest.raises(ValueError, match="at least 32 px"):
        make_synthetic_dataset("synthetic-luad", tmp_path / "b", 2, 2, 2, size=16)
    with pytest.raises(ValueError, match="real dataset; expected a description with a 'synthetic' entry"):
        make_synthetic_dataset("luad-histoseg", tmp_path / "c", 2, 2, 2, size=32)
    with pytest.raises(KeyError, match="synthetic-bcss"):
        make_synthetic_dataset("synthetic-foo", tmp_path / "d", 2, 2, 2, size=32)
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_dataset("synthetic-luad", tmp_path / "e", 2, 2, 2, size=32)
