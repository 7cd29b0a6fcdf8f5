"""Benchmark: images per second through the training DataLoader, before and after uint8 batches with
persistent workers, against plain PIL decoding of the same files.

Decoding is the hot path of training (16,678 + 23,422 training patches per epoch, 100 epochs). The limit
is plain PIL decoding (``Image.open(path).convert("RGB")`` into a numpy array) spread over the same
number of processes; the loader adds the label, the random dihedral augmentation and batching. Two
loaders side by side, each over ``--epochs`` timed epochs after one warm-up epoch (files in the page
cache), so the table compares decoding and transfer work, not the disk:

- before: the workers normalise to float32 (4 bytes per pixel channel sent to the main process) and are
  started afresh every epoch (what training did, and evaluate and pseudo-masks ran with no workers);
- after: the workers send uint8 (1 byte), stay up across epochs (persistent), and the main process
  normalises each batch with :func:`pathmamba.data.datasets.normalised_batch`: here on the CPU, the
  worst case; on a GPU run that work moves to the device.

    python -m benchmarks.data_loading                          # 512 synthetic 224 px patches
    python -m benchmarks.data_loading --data-root resources/datasets/luad-histoseg --dataset luad-histoseg

Prints a markdown table: workers, PIL images/s, before and after images/s, after / before, after / PIL.
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

from pathmamba.data.datasets import ImageLabelDataset, normalise, normalised_batch
from pathmamba.data.readers import index_dataset
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


class Float32ImageLabelDataset(ImageLabelDataset):
    """The training dataset as it was before: each worker normalises its images to float32."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(index)
        return normalise(image), label


def loader_images_per_s(items, workers: int, batch_size: int, epochs: int, before: bool) -> float:
    """Images per second over ``epochs`` epochs (after a warm-up one) through the DataLoader as training
    built it ``before`` (float32 batches, workers restarted each epoch) or builds it now (uint8 batches
    normalised by the main process, persistent workers); augmentation on."""
    dataset = (Float32ImageLabelDataset if before else ImageLabelDataset)(items, augment=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0 and not before,
                        generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def epoch() -> int:
        count = 0
        for images, labels in loader:
            if not before:
                normalised_batch(images, cpu)
            count += len(labels)
        return count

    epoch()  # warm-up: files in the page cache (and, after, the workers started once)
    start = time.perf_counter()
    count = sum(epoch() for _ in range(epochs))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=None, help="a dataset folder; default: synthetic")
    parser.add_argument("--dataset", default="synthetic-luad")
    parser.add_argument("--n-images", type=int, default=512, help="training images used (first by name)")
    parser.add_argument("--size", type=int, default=224, help="patch side of the synthetic dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader")
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
        print(f"{len(paths)} training images of {args.dataset} ({shape} px PNG), batch {args.batch_size}, "
              f"{args.epochs} timed epochs\n")
        print("| workers | PIL decode (images/s) | before: float32, workers per epoch (images/s) "
              "| after: uint8, persistent workers (images/s) | after / before | after / PIL |")
        print("|---:|---:|---:|---:|---:|---:|")
        for workers in args.workers:
            pil = pil_images_per_s(paths, workers)
            before = loader_images_per_s(items, workers, args.batch_size, args.epochs, before=True)
            after = loader_images_per_s(items, workers, args.batch_size, args.epochs, before=False)
            print(f"| {workers} | {pil:.0f} | {before:.0f} | {after:.0f} | {after / before:.2f} | "
                  f"{after / pil:.2f} |", flush=True)


if __name__ == "__main__":
    main()
