"""Pseudo masks of every training image, written once by a two-stage method's first stage.

Layout of the output folder: one sub-folder per mask kind (e.g. ``layer4/``, ``layer3/``, ``layer2/``
for WSSS-Tissue), each holding a palette PNG per training image under the image's own file name (in the
dataset's colours, so they can be looked at), and ``manifest.json`` (mask kinds, image count, the
stage-1 model they came from). The folder is built in a fresh temporary sibling of its destination and
renamed into place when complete, so an interrupted job leaves no partial folder behind. An existing
destination is replaced only if it is a pseudo-mask folder this tool wrote (its manifest names exactly
what is in it, see :func:`not_ours`), and only once the new folder is in place; anything else there is
refused, never deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch.utils.data import DataLoader

from pathmamba.core.devices import autocast
from pathmamba.core.files import atomic_write_json, file_sha256
from pathmamba.core.outputs import check_replaceable, new_sibling, put_in_place
from pathmamba.core.progress import ProgressLog
from pathmamba.data.datasets import PSEUDO_MASK_MANIFEST, ImageLabelDataset, default_workers, normalised_batch
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import recorded_spec
from pathmamba.engine.evaluate import inference_setup, load_model, save_palette_mask

log = logging.getLogger("pathmamba.engine.pseudo_masks")

WHAT = "a pseudo-mask folder"


def not_ours(folder: Path) -> str | None:
    """Why the existing ``folder`` is not a pseudo-mask folder written by this tool (None if it is, or if
    it is an empty folder: nothing to lose). Ours holds exactly its ``manifest.json`` and the mask-kind
    folders the manifest names, each holding files only."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder" if not folder.is_symlink() else "a symbolic link"
    entries = {entry.name for entry in folder.iterdir()}
    if not entries:
        return None
    try:
        manifest = json.loads((folder / PSEUDO_MASK_MANIFEST).read_text())
        kinds = [str(kind) for kind in manifest["masks"]]
        if not {"method", "dataset", "images", "stage1_sha256"} <= set(manifest):
            raise KeyError("stage1_sha256")
    except (OSError, ValueError, KeyError, TypeError):
        return f"no pseudo-mask {PSEUDO_MASK_MANIFEST} of this tool in it"
    if extra := sorted(entries - {PSEUDO_MASK_MANIFEST, *kinds}):
        return f"it holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} besides the pseudo masks"
    for kind in kinds:
        masks = folder / kind
        if masks.is_symlink() or (masks.exists() and (not masks.is_dir()
                                                      or any(entry.is_dir() for entry in masks.iterdir()))):
            return f"{kind} is not a folder of mask files"
    return None


def write_pseudo_masks(model_path: Path, data_root: Path, out_dir: Path, device: str = "auto",
                       batch_size: int = 16, workers: int | None = None, scan: str | None = None,
                       precision: str | None = None) -> dict:
    """Write the pseudo masks of the stage-1 model in ``model_path`` for every training image of its
    dataset into ``out_dir``; returns the manifest. ``workers``: loader processes, default as training's
    (:func:`pathmamba.data.datasets.default_workers`). ``scan``, ``precision``: see
    :func:`pathmamba.engine.evaluate.inference_setup`."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, not_ours, WHAT)  # before any work
    checkpoint, model = load_model(model_path)
    if checkpoint.get("stage") != 1:
        raise ValueError(f"{model_path}: a model of {checkpoint['method']!r} (stage {checkpoint.get('stage')}); "
                         "expected the model file of a first stage (trained with `train --stage 1`)")
    torch_device, precision, environment = inference_setup(checkpoint, device, scan, precision)
    spec = recorded_spec(checkpoint)
    index = index_dataset(Path(data_root), spec)
    model.to(torch_device).eval()
    kinds = list(model.pseudo_mask_names)
    # A fresh folder of this process's own: deleting it on failure removes nothing else.
    building = new_sibling(out_dir, "building")
    try:
        for kind in kinds:
            (building / kind).mkdir()
        if workers is None:
            workers = default_workers(torch_device)
        loader = DataLoader(ImageLabelDataset(index.train), batch_size=batch_size, shuffle=False,
                            num_workers=workers, pin_memory=torch_device.type == "cuda")
        names = [image.name for image, _ in index.train]
        progress = ProgressLog(log, "training images", len(names))
        done = 0
        for images, labels in loader:
            with autocast(torch_device, precision):
                masks = model.pseudo_masks(normalised_batch(images, torch_device), labels.to(torch_device), spec)
            for kind, kind_masks in zip(kinds, masks, strict=True):
                for offset, mask in enumerate(kind_masks.cpu().numpy()):
                    save_palette_mask(mask, spec.flat_palette, building / kind / names[done + offset])
            done += len(images)
            progress.update(len(images))
        manifest = {"method": checkpoint["method"], "dataset": spec.name, "seed": checkpoint["seed"],
                    "masks": kinds, "images": done, "stage1_model": str(model_path),
                    "stage1_sha256": file_sha256(model_path), "environment": environment}
        atomic_write_json(building / PSEUDO_MASK_MANIFEST, manifest)
        put_in_place(building, out_dir, not_ours, WHAT)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already after a successful rename
    log.info("wrote %d x %d pseudo masks (%s) of %s to %s", done, len(kinds), ", ".join(kinds), model_path, out_dir)
    return manifest
