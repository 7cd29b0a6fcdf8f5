"""Pseudo masks of every training image, written once by a two-stage method's first stage.

Layout of the output folder: one sub-folder per mask kind (e.g. ``layer4/``, ``layer3/``, ``layer2/``
for WSSS-Tissue), each holding a palette PNG per training image under the image's own file name (in the
dataset's colours, so they can be looked at), and ``manifest.json`` (mask kinds, image count, the
stage-1 model they came from). The folder is built beside its destination and renamed into place when
complete, so an interrupted job leaves no partial folder behind.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch.utils.data import DataLoader

from pathmamba.data.acquire import sha256
from pathmamba.data.datasets import PSEUDO_MASK_MANIFEST, ImageLabelDataset
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import get_dataset_spec
from pathmamba.evaluate import inference_setup, load_model, save_palette_mask
from pathmamba.runtime import atomic_write_json, autocast

log = logging.getLogger("pathmamba.pseudo_masks")


def write_pseudo_masks(model_path: Path, data_root: Path, out_dir: Path, device: str = "auto",
                       batch_size: int = 16, workers: int = 0, scan: str | None = None,
                       precision: str | None = None) -> dict:
    """Write the pseudo masks of the stage-1 model in ``model_path`` for every training image of its
    dataset into ``out_dir``; returns the manifest. ``scan``, ``precision``: see
    :func:`pathmamba.evaluate.inference_setup`."""
    checkpoint, model = load_model(model_path)
    if checkpoint.get("stage") != 1:
        raise ValueError(f"{model_path}: a model of {checkpoint['method']!r} (stage {checkpoint.get('stage')}); "
                         "expected the model file of a first stage (trained with `train --stage 1`)")
    torch_device, precision, environment = inference_setup(checkpoint, device, scan, precision)
    spec = get_dataset_spec(checkpoint["dataset"])
    index = index_dataset(Path(data_root), spec)
    model.to(torch_device).eval()
    kinds = list(model.pseudo_mask_names)
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for kind in kinds:
        (partial / kind).mkdir(parents=True)
    loader = DataLoader(ImageLabelDataset(index.train), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=torch_device.type == "cuda")
    names = [image.name for image, _ in index.train]
    done = 0
    for images, labels in loader:
        with autocast(torch_device, precision):
            masks = model.pseudo_masks(images.to(torch_device), labels.to(torch_device), spec.name)
        for kind, kind_masks in zip(kinds, masks):
            for offset, mask in enumerate(kind_masks.cpu().numpy()):
                save_palette_mask(mask, spec.flat_palette, partial / kind / names[done + offset])
        done += len(images)
    manifest = {"method": checkpoint["method"], "dataset": spec.name, "seed": checkpoint["seed"],
                "masks": kinds, "images": done, "stage1_model": str(model_path),
                "stage1_sha256": sha256(model_path), "environment": environment}
    atomic_write_json(partial / PSEUDO_MASK_MANIFEST, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    log.info("wrote %d x %d pseudo masks (%s) of %s to %s", done, len(kinds), ", ".join(kinds), model_path, out_dir)
    return manifest
