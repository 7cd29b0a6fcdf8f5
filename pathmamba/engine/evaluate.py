"""Prediction and evaluation on a split: both metric protocols, per-image scores, palette masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pathmamba.core.devices import autocast, resolve_device, resolve_precision
from pathmamba.core.environment import describe_environment, environment_record
from pathmamba.core.files import atomic_write_json, atomic_write_text, csv_text
from pathmamba.core.layout import PER_IMAGE, TEST_METRICS, TRIVIAL
from pathmamba.core.progress import ProgressLog
from pathmamba.core.torch_files import load_torch_file
from pathmamba.data.datasets import ImageMaskDataset, default_workers, normalised_batch
from pathmamba.data.readers import index_dataset, read_mask
from pathmamba.data.specs import get_dataset_spec, recorded_spec
from pathmamba.engine.metrics import SegmentationMeter
from pathmamba.engine.model_files import build_recorded_model, check_model_record, load_checked_weights
from pathmamba.engine.registry import selection_predictor
from pathmamba.models.scan import select_scan

log = logging.getLogger("pathmamba.engine.evaluate")


def flip_averaged_scores(model, images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: scores averaged over identity, horizontal and vertical flips."""
    scores = model.predict(images)
    scores = scores + model.predict(images.flip(-1)).flip(-1)
    scores = scores + model.predict(images.flip(-2)).flip(-2)
    return scores / 3


@torch.no_grad()
def predict_split(model, loader: DataLoader, device: torch.device, num_classes: int, tta: bool = False,
                  names: list[str] | None = None, on_batch=None, channels_last: bool = False,
                  precision: str = "fp32", selection: bool = False) -> SegmentationMeter:
    """Predict every batch of (uint8 image, mask, index) and accumulate the metrics of ``num_classes`` classes.

    ``selection``: predict as model selection does (:func:`pathmamba.engine.registry.selection_predictor`).

    ``channels_last``: feed batches in the NHWC layout (for a model converted to it, on CUDA).
    ``precision``: a resolved precision (:func:`pathmamba.core.devices.resolve_precision`).

    ``on_batch(indices, predicted_masks)`` is called per batch (e.g. to save masks).
    """
    model.eval()
    meter = SegmentationMeter(num_classes)
    predict = selection_predictor(model) if selection else model.predict
    for images, masks, indices in loader:
        images = normalised_batch(images, device, channels_last)
        with autocast(device, precision):
            scores = flip_averaged_scores(model, images) if tta else predict(images)
        predicted = scores.float().argmax(1).cpu()
        meter.update(predicted, masks, [names[i] for i in indices.tolist()] if names else None)
        if on_batch is not None:
            on_batch(indices.tolist(), predicted, masks)
    return meter


def load_model(model_path: Path) -> tuple[dict, torch.nn.Module]:
    """(the ``model.pt`` record written by training, the model built from it with its weights, on the CPU).

    Built without the pretrained weights files its hparams name: the record's weights replace them all,
    and the evaluate and pseudo-mask jobs do not have those files among their inputs. A file that does
    not fit the registry (:mod:`pathmamba.engine.model_files`) is an ``InputError`` naming it.
    """
    checkpoint = load_torch_file(model_path, "model file")
    check_model_record(checkpoint, model_path)
    model = build_recorded_model(checkpoint, model_path)
    load_checked_weights(model, checkpoint["state_dict"], model_path, checkpoint["method"])
    return checkpoint, model


def inference_setup(checkpoint: dict, device: str, scan: str | None, precision: str | None):
    """(torch device, resolved precision, environment record) of a job that runs a trained model.

    ``scan`` and ``precision`` default to the settings the model was trained with; the log's first
    line says what runs.
    """
    trained = checkpoint.get("settings", {})
    torch_device = resolve_device(device)
    scan = select_scan(scan or trained.get("scan", "auto"), torch_device)
    precision = resolve_precision(precision or trained.get("precision", "auto"), torch_device)
    environment = environment_record(torch_device, scan, precision)
    log.info("%s", describe_environment(environment))
    return torch_device, precision, environment


def colour_mask(mask: np.ndarray, palette) -> np.ndarray:
    """(H, W) class indices 0..K (K background) -> (H, W, 3) uint8 RGB in the dataset's palette."""
    return np.asarray(palette, dtype=np.uint8)[mask]


def overlay_mask(image: np.ndarray, mask: np.ndarray, palette, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: the tissue classes' colours of ``mask`` blended over ``image`` with opacity
    ``alpha``; background pixels (index K, the palette's last colour; not scored) keep the image's own
    pixels."""
    colours = colour_mask(mask, palette).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    tissue = (mask < len(palette) - 1)[..., None]
    return np.rint(np.where(tissue, blended, image)).astype(np.uint8)


def save_palette_mask(mask: np.ndarray, palette: list[int], path: Path) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette)
    image.save(path)


def _write_results(out_dir: Path, meter: SegmentationMeter, record: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**record, "protocols": meter.summary()}
    atomic_write_text(out_dir / PER_IMAGE, csv_text(meter.per_image()))
    atomic_write_json(out_dir / TEST_METRICS, record)
    return record


def evaluate(model_path: Path, data_root: Path, out_dir: Path, masks_dir: Path | None = None,
             n_masks: int = 4, tta: bool = False, device: str = "auto", batch_size: int = 16,
             workers: int | None = None, scan: str | None = None, precision: str | None = None) -> dict:
    """Evaluate a trained ``model.pt`` once on the test split of its dataset.

    Writes ``test_metrics.json`` (both protocols, per-class values), ``per_image.csv`` and, into
    ``masks_dir``, palette PNGs of the predicted masks of the first ``n_masks`` test images by file
    name: each the method's own prediction, a class 0..K-1 at every pixel (the ground truth's background is
    applied only when scoring; the figures mark it, pathmamba/reporting/plots.py). ``workers``: loader processes,
    default as training's (:func:`pathmamba.data.datasets.default_workers`). ``scan`` and
    ``precision``: see :func:`inference_setup`.
    """
    checkpoint, model = load_model(model_path)
    torch_device, precision, environment = inference_setup(checkpoint, device, scan, precision)
    spec = recorded_spec(checkpoint)
    index = index_dataset(Path(data_root), spec)
    model.to(torch_device)
    channels_last = torch_device.type == "cuda"  # NHWC: the layout tensor-core convolutions prefer
    if channels_last:
        model.to(memory_format=torch.channels_last)
    names = [image.name for image, _ in index.test]
    if workers is None:
        workers = default_workers(torch_device)
    loader = DataLoader(ImageMaskDataset(index.test, spec), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=torch_device.type == "cuda")

    progress = ProgressLog(log, "test images", len(names))

    def save_masks(indices: list[int], predicted: torch.Tensor, truth: torch.Tensor) -> None:
        progress.update(len(indices))
        for i, pred in zip(indices, predicted, strict=True):
            if i < n_masks and masks_dir is not None:
                save_palette_mask(pred.numpy(), spec.flat_palette, Path(masks_dir) / names[i])

    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    meter = predict_split(model, loader, torch_device, spec.num_classes, tta=tta, names=names, on_batch=save_masks,
                          channels_last=channels_last, precision=precision)
    record = {"method": checkpoint["method"], "dataset": spec.name, "seed": checkpoint["seed"],
              "classes": list(spec.classes), "dataset_description": spec.description, "best_epoch": checkpoint["epoch"],
              "best_val_mIoU": checkpoint["val_mIoU"], "tta": tta, "test_images": len(names),
              "environment": environment}
    result = _write_results(Path(out_dir), meter, record)
    log.info("%s on %s seed %s: test mIoU %.4f mDice %.4f", checkpoint["method"], spec.name,
             checkpoint["seed"], result["protocols"]["ignore_background"]["mIoU"],
             result["protocols"]["ignore_background"]["mDice"])
    return result


def evaluate_trivial(dataset: str, data_root: Path, out_dir: Path) -> dict:
    """The trivial reference: every scored pixel of a test image gets the class that is most frequent
    in the training labels among the classes present in that image's ground truth.

    It is given the test images' true class sets, so it is an upper bound for "guess one class per
    image" and a floor that a method learning localisation from image-level labels must clear.
    """
    spec = get_dataset_spec(dataset)
    index = index_dataset(Path(data_root), spec)
    frequency = np.array([label for _, label in index.train], dtype=np.float64).sum(0)
    meter = SegmentationMeter(spec.num_classes)
    for image_path, mask_path in index.test:
        truth = read_mask(mask_path, spec)
        present = [c for c in range(spec.num_classes) if (truth == c).any()]
        choice = max(present, key=lambda c: frequency[c]) if present else int(frequency.argmax())
        prediction = np.full_like(truth, choice)
        meter.update(torch.from_numpy(prediction[None]), torch.from_numpy(truth[None]), [image_path.name])
    record = {"method": TRIVIAL, "dataset": spec.name, "seed": None, "classes": list(spec.classes),
              "dataset_description": spec.description,
              "tta": False, "test_images": len(index.test),
              "description": "most frequent training class among each test image's true classes"}
    record = _write_results(Path(out_dir), meter, record)
    scores = record["protocols"]["ignore_background"]
    log.info("trivial reference on %s (%d test images): test mIoU %.4f mDice %.4f; wrote %s", spec.name,
             len(index.test), scores["mIoU"], scores["mDice"], out_dir)
    return record
