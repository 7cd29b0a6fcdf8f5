"""Torch datasets over indexed files: image-level labels for training, pixel masks for val/test.

Decoding is the hot path of training: one PIL decode and one uint8 copy per image, no per-pixel
Python. Images leave the datasets as uint8, a quarter of the bytes of float32 between loader workers
and the main process and to the device; :func:`normalised_batch` widens and normalises a batch where
the model runs (benchmarks/data_loading.py measures both).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pathmamba.data.readers import read_image, read_mask
from pathmamba.data.specs import DatasetSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@cache
def _scale_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, (3, 1, 1) on ``device``, so uint8 pixels are normalised in one
    subtract and one divide; made once per device (a copy to a GPU per batch would wait for the GPU)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return mean.to(device), std.to(device)


def to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) uint8, contiguous (a fresh writable copy, so no torch warning)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalise(chw: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) uint8 -> float32 of that shape, normalised with the ImageNet mean and std
    on the tensor's device."""
    mean, std = _scale_255(chw.device)
    return chw.float().sub_(mean).div_(std)


def normalised_batch(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> on ``device``, (B, 3, H, W) float32 normalised with the ImageNet mean and std.

    The arithmetic of :func:`normalise` (widen, subtract, divide; each element on its own), so a batch is
    bitwise what normalising its images one by one on the CPU gives. ``channels_last``: the NHWC layout
    (for a model converted to it), set while the batch is still uint8.
    """
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalise(images)


def default_workers(device: torch.device) -> int:
    """Loader workers for a job on ``device`` with torch's CPU threads: on CUDA all but one thread decode
    images while the GPU computes; on the CPU none, because the model's own compute needs every core
    (measured with benchmarks/training_throughput.py)."""
    return max(0, torch.get_num_threads() - 1) if device.type == "cuda" else 0


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised with the ImageNet mean and std.

    The transpose is copied as uint8 and only then widened to float: a strided float copy was 3x
    slower (benchmarks/data_loading.py).
    """
    return normalise(to_chw(image))


def random_dihedral(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply one random flip/rotation by a multiple of 90 degrees to the last two dims of all tensors.

    One draw of ``torch.randint`` picks one of the 8 symmetries of the square (4 rotations, each
    with or without a horizontal flip; a vertical flip is a horizontal flip plus a half turn), so
    images and masks stay aligned and DataLoader worker seeding makes the choice reproducible.
    Tensors are (..., H, W) with H == W, as the 224 px patches are.
    """
    choice = int(torch.randint(8, ()))
    out = []
    for tensor in tensors:
        tensor = torch.rot90(tensor, choice % 4, dims=(-2, -1))
        if choice >= 4:
            tensor = tensor.flip(-1)
        out.append(tensor.contiguous())
    return tuple(out)


class AugmentableDataset(Dataset):
    """A dataset that augments its items at random when ``augment`` is set."""

    augment: bool

    def unaugmented(self) -> AugmentableDataset:
        """A shallow copy of this dataset that gives its items without augmentation (e.g. to extract
        features of the training images, as SC-CAM's clustering does)."""
        dataset = copy.copy(self)
        dataset.augment = False
        return dataset


def without_augmentation(dataset: Dataset) -> Dataset:
    """``dataset`` giving its items unaugmented: its :meth:`~AugmentableDataset.unaugmented` copy (the engine's
    seeding wrapper passes it on), or ``dataset`` itself when it has no augmentation to switch off."""
    return dataset.unaugmented() if hasattr(dataset, "unaugmented") else dataset


class ImageLabelDataset(AugmentableDataset):
    """Training images with image-level labels.

    ``items``: (image path, label) pairs, label K ints 0/1 (K the dataset's classes). ``__getitem__`` returns
    (image (3, H, W) uint8, label (K,) float32 multi-hot).
    """

    def __init__(self, items: list[tuple[Path, tuple[int, ...]]], augment: bool = False):
        self.paths = [Path(path) for path, _ in items]
        self.labels = torch.tensor([label for _, label in items], dtype=torch.float32)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_chw(read_image(self.paths[index]))
        if self.augment:
            (image,) = random_dihedral(image)
        return image, self.labels[index]


class ImageMaskDataset(AugmentableDataset):
    """Images with pixel masks (val/test).

    ``items``: (image path, mask path) pairs. ``__getitem__`` returns (image (3, H, W) uint8, mask
    (H, W) int64 with 0..K-1 tissue and K the ignored background, the item's index).
    """

    def __init__(self, items: list[tuple[Path, Path]], spec: DatasetSpec, augment: bool = False):
        self.items = [(Path(image), Path(mask)) for image, mask in items]
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, mask_path = self.items[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.spec)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]} px; expected the same size"
            )
        image_tensor = to_chw(image)
        mask_tensor = torch.from_numpy(mask.astype(np.int64))
        if self.augment:
            image_tensor, mask_tensor = random_dihedral(image_tensor, mask_tensor)
        return image_tensor, mask_tensor, index


#: The record a pseudo-mask folder ends with (``pathmamba.engine.pseudo_masks``): which masks, for how many images.
PSEUDO_MASK_MANIFEST = "manifest.json"


class PseudoMaskDataset(AugmentableDataset):
    """Training images with the pseudo masks a two-stage method's first stage wrote for them.

    ``folder`` holds one sub-folder per mask kind (listed in its ``manifest.json`` under ``masks``), each
    with a P-mode PNG per training image under the image's file name. ``__getitem__`` returns (image
    (3, H, W) uint8, masks (kinds, H, W) int64 with the classes and the ignored background index), one dihedral
    augmentation applied to all of them alike.
    """

    def __init__(self, items: list[tuple[Path, tuple[int, ...]]], folder: Path, spec: DatasetSpec,
                 augment: bool = False):
        folder = Path(folder)
        manifest_path = folder / PSEUDO_MASK_MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no pseudo-mask manifest; expected the folder written "
                                    "by `python -m pathmamba pseudo-masks`")
        self.kinds = json.loads(manifest_path.read_text())["masks"]
        self.images = [Path(path) for path, _ in items]
        self.mask_paths = [[folder / kind / image.name for kind in self.kinds] for image in self.images]
        missing = [path for paths in self.mask_paths for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {len(missing)} pseudo masks missing for the "
                                    f"{len(self.images)} training images, e.g. {missing[0]}; rewrite the "
                                    "folder with `python -m pathmamba pseudo-masks`")
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_chw(read_image(self.images[index]))
        masks = torch.from_numpy(np.stack([read_mask(path, self.spec) for path in self.mask_paths[index]])
                                 .astype(np.int64))
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"{self.mask_paths[index][0]}: pseudo mask is {masks.shape[-1]}x{masks.shape[-2]} "
                             f"px but its image {self.images[index]} is {image.shape[-1]}x{image.shape[-2]} px")
        if self.augment:
            image, masks = random_dihedral(image, masks)
        return image, masks
