"""Benchmark: images per second through the training DataLoader against plain PIL decoding of the same files.

Decoding is the hot path of training (16,678 + 23,422 training patches per epoch, 100 epochs). The limit
is plain PIL decoding (``Image.open(path).convert("RGB")`` into a numpy array) spread over the same
number of processes; the loader adds the label, uint8 -> float32 normalisation, the random dihedral
augmentation and batching. Both read each file once per epoch, after one warm-up epoch (files in the
page cache, loader workers started), so the table compares decoding work, not the disk.

    python -m benchmarks.data_loading                          # 512 synthetic 224 px patches
    python -m benchmarks.data_loading --data-root resources/datasets/luad-histoseg --dataset luad-histoseg

Prints a markdown table: workers, PIL images/s, DataLoader images/s, loader / PIL, and the same loader
stopped before normalisation (uint8 batches), which shows what the float32 batches cost between processes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pathmamba.data.datasets import ImageLabelDataset, random_dihedral, to_chw
from pathmamba.data.readers import index_dataset, read_image
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset


def _decode(path: Path) -> int:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).shape[0]


def pil_images_per_s(paths: list[Path], workers: int) -> float:
    """Plain PIL decoding of every path, in this process (0 workers) or a pool of ``workers`` processes."""
    if workers == 0:
        start = time.perf_counter()
        for path in paths:
            _decode(path)
        return len(paths) / (time.perf_counter() - start)
    with Pool(workers) as pool:
        pool.map(_decode, paths[: workers * 4])  # start the processes before timing
        start = time.perf_counter()
        pool.map(_decode, paths, chunksize=16)
        return len(paths) / (time.perf_counter() - start)


class Uint8ImageLabelDataset(ImageLabelDataset):
    """The training dataset stopped before normalisation: (3, H, W) uint8, a quarter of the bytes that
    loader workers pass to the main process (normalising would then happen after the device transfer)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_chw(read_image(self.paths[index]))
        if self.augment:
            (image,) = random_dihedral(image)
        return image, self.labels[index]


def loader_images_per_s(items, workers: int, batch_size: int, dataset=ImageLabelDataset) -> float:
    """One epoch through the DataLoader as :func:`pathmamba.train` builds it (augmentation on)."""
    loader = DataLoader(dataset(items, augment=True), batch_size=batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up epoch: starts the workers
        pass
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=None, help="a dataset folder; default: synthetic")
    parser.add_argument("--dataset", default="synthetic-luad")
    parser.add_argument("--n-images", type=int, default=512, help="training images used (first by name)")
    parser.add_argument("--size", type=int, default=224, help="patch side of the synthetic dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a loader worker runs; the main process only collates here

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root
        if root is None:
            root = Path(scratch) / args.dataset
            make_synthetic_dataset(args.dataset, root, n_train=args.n_images, n_val=1, n_test=1,
                                   size=args.size, seed=0)
        items = index_dataset(root, get_dataset_spec(args.dataset)).train[: args.n_images]
        paths = [path for path, _ in items]
        pil_images_per_s(paths, 0)  # warm the page cache
        with Image.open(paths[0]) as first:
            shape = f"{first.size[0]}x{first.size[1]}"
        print(f"{len(paths)} training images of {args.dataset} ({shape} px PNG), batch {args.batch_size}\n")
        print("| workers | PIL decode (images/s) | training DataLoader (images/s) | loader / PIL "
              "| uint8 DataLoader (images/s) | uint8 / PIL |")
        print("|---:|---:|---:|---:|---:|---:|")
        for workers in args.workers:
            pil = pil_images_per_s(paths, workers)
            loader = loader_images_per_s(items, workers, args.batch_size)
            uint8 = loader_images_per_s(items, workers, args.batch_size, Uint8ImageLabelDataset)
            print(f"| {workers} | {pil:.0f} | {loader:.0f} | {loader / pil:.2f} | {uint8:.0f} | "
                  f"{uint8 / pil:.2f} |", flush=True)


if __name__ == "__main__":
    main()
