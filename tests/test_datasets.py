"""Torch datasets: tensor shapes and types (uint8 images), normalisation of batches, aligned and
reproducible augmentation, the epoch reaching persistent loader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathmamba.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLabelDataset,
    ImageMaskDataset,
    normalised_batch,
    random_dihedral,
    to_tensor,
)
from pathmamba.data.readers import index_dataset, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset

SPEC = get_dataset_spec("synthetic-bcss")
SIZE = 32


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "bcss"
    make_synthetic_dataset(SPEC.name, root, n_train=4, n_val=3, n_test=2, size=SIZE, seed=0)
    return index_dataset(root, SPEC)


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8, the inverse of to_tensor."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).mul(255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def test_to_tensor_normalises_with_imagenet_statistics():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[0, 0] = [round(255 * m) for m in IMAGENET_MEAN]
    image[1, 2] = 255
    x = to_tensor(image)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.zeros(3), atol=0.01)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(x[:, 1, 2], torch.tensor(expected))
    np.testing.assert_array_equal(_denormalise(x), image)


def test_image_label_dataset_items(index):
    dataset = ImageLabelDataset(index.train)
    assert len(dataset) == 4
    for i, (path, label) in enumerate(index.train):
        image, target = dataset[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        assert target.dtype == torch.float32 and target.tolist() == list(label)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.open(path)))


def test_image_mask_dataset_items(index):
    dataset = ImageMaskDataset(index.val, SPEC)
    assert len(dataset) == 3
    for i, (image_path, mask_path) in enumerate(index.val):
        image, mask, item = dataset[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.int64
        assert item == i
        np.testing.assert_array_equal(mask.numpy(), read_mask(mask_path, SPEC))
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.open(image_path)))


def test_a_normalised_batch_is_bitwise_the_images_normalised_one_by_one(index):
    """What the datasets gave before (each image normalised by itself, float32) is what a uint8 batch
    normalised at once gives now: no trained number moves."""
    images = torch.stack([ImageLabelDataset(index.train)[i][0] for i in range(4)])
    one_by_one = torch.stack([to_tensor(image.permute(1, 2, 0).numpy()) for image in images])
    batch = normalised_batch(images, torch.device("cpu"))
    assert batch.dtype == torch.float32 and torch.equal(batch, one_by_one)
    nhwc = normalised_batch(images, torch.device("cpu"), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, one_by_one)


def test_a_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 6)).save(tmp_path / "a-mask.png")
    dataset = ImageMaskDataset([(tmp_path / "a.png", tmp_path / "a-mask.png")], SPEC)
    with pytest.raises(ValueError, match=r"a-mask\.png: mask is 8x6 px but its image .*a\.png is 8x8 px"):
        dataset[0]


@pytest.fixture
def encoded(tmp_path) -> list[tuple[Path, Path]]:
    """An image whose red channel encodes its (asymmetric, random) mask: red = 50 * class."""
    mask = np.random.default_rng(0).integers(0, 5, (12, 12)).astype(np.uint8)
    image = np.stack([mask * 50, np.arange(144, dtype=np.uint8).reshape(12, 12), np.full_like(mask, 9)], -1)
    Image.fromarray(image).save(tmp_path / "img.png")
    indexed = Image.fromarray(mask)
    indexed.putpalette(SPEC.flat_palette)
    indexed.save(tmp_path / "mask.png")
    return [(tmp_path / "img.png", tmp_path / "mask.png")]


def test_augmentation_keeps_image_and_mask_aligned_and_covers_all_eight_symmetries(encoded):
    dataset = ImageMaskDataset(encoded, SPEC, augment=True)
    original = ImageMaskDataset(encoded, SPEC)[0][1]
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        image, mask, _ = dataset[0]
        assert mask.is_contiguous() and image.is_contiguous()
        np.testing.assert_array_equal(image[0].numpy() // 50, mask.numpy())
        seen.add(mask.numpy().tobytes())
    expected = set()
    for k in range(4):
        rotated = torch.rot90(original, k)
        expected |= {rotated.numpy().tobytes(), rotated.flip(-1).numpy().tobytes()}
    assert len(expected) == 8 and seen == expected


def test_augmentation_follows_torch_seed(index, encoded):
    labelled = ImageLabelDataset(index.train, augment=True)
    masked = ImageMaskDataset(encoded, SPEC, augment=True)

    def draw(seed):
        torch.manual_seed(seed)
        return [labelled[i % 4][0] for i in range(8)] + [masked[0][1] for _ in range(8)]

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_random_dihedral_applies_one_transform_to_all_tensors():
    a = torch.arange(16.0).view(1, 4, 4)
    torch.manual_seed(3)
    for _ in range(16):
        x, y = random_dihedral(a, a[0].long())
        assert torch.equal(x[0].long(), y)


def test_persistent_workers_see_each_epoch_and_draw_what_the_main_process_draws(index):
    """The epoch reaches workers that stay up across epochs (shared memory), so each image's
    augmentation is a function of (seed, epoch, image) with any number of workers."""
    from torch.utils.data import DataLoader

    from pathmamba.engine.train import EpochSeeded

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        seeded = EpochSeeded(ImageLabelDataset(index.train, augment=True), seed=0)
        loader = DataLoader(seeded, batch_size=2, num_workers=workers, persistent_workers=workers > 0)
        drawn = []
        for epoch in (1, 2, 3):
            seeded.set_epoch(epoch)
            drawn.append([image for images, _ in loader for image in images])
        if workers:
            assert loader._iterator is not None and loader._iterator._persistent_workers  # kept, not restarted
        return drawn

    in_main, in_workers = epochs(0), epochs(2)
    for main_epoch, worker_epoch in zip(in_main, in_workers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(main_epoch, worker_epoch, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(in_workers[0], in_workers[1], strict=True))
