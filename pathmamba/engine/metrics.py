"""Segmentation metrics (docs/design.md §4).

Two protocols, both written out and labelled:

``ignore_background`` (primary; WSSS-Tissue, mmseg ``ignore_index``)
    A KxK confusion matrix over the whole split (K tissue classes, 4 in the published datasets); pixels
    whose ground truth is K (the background) are ignored.
``with_background`` (sensitivity only; TPRO, PBIP)
    A (K+1)x(K+1) matrix with background kept as a class of its own; means over the K tissue classes only.

Per class: IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), precision = TP/(TP+FP), recall = TP/(TP+FN);
the m-metrics are nan-means over the tissue classes (a class with an empty denominator is nan).
"""

from __future__ import annotations

import numpy as np
import torch

PROTOCOLS = ("ignore_background", "with_background")
METRICS = ("mDice", "mIoU", "mPrecision", "mRecall")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None) -> torch.Tensor:
    """Confusion matrix (num_classes, num_classes), rows = ground truth, columns = prediction.

    pred, target: integer tensors of the same shape. Pixels whose target equals ``ignore_index`` are
    dropped; with ``ignore_index=None`` every pixel counts. One bincount for the whole batch.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(pred.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (ignore index {ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.float64)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int | None) -> torch.Tensor:
    """Per-image confusion matrices (B, num_classes, num_classes) of a batch (B, H, W), one bincount."""
    batch = pred.shape[0]
    pred = pred.reshape(batch, -1).long()
    target = target.reshape(batch, -1).long()
    image = torch.arange(batch, device=pred.device).unsqueeze(1).expand_as(target)
    cells = (image * num_classes + target) * num_classes + pred
    if ignore_index is not None:
        cells = cells[target != ignore_index]
    counts = torch.bincount(cells.reshape(-1), minlength=batch * num_classes * num_classes)
    return counts.reshape(batch, num_classes, num_classes).to(torch.float64)


def scores_from_confusion(confusion: np.ndarray | torch.Tensor, num_tissue: int | None = None) -> dict:
    """Per-class IoU, Dice, precision, recall and their means over the first ``num_tissue`` classes (None:
    all classes of the matrix).

    Returns ``{"mIoU": float, ..., "per_class": {"IoU": [..], "Dice": [..], ...}}``; nan where a
    denominator is zero (a class absent from both prediction and ground truth).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = {
            "IoU": tp / (tp + fp + fn),
            "Dice": 2 * tp / (2 * tp + fp + fn),
            "Precision": tp / (tp + fp),
            "Recall": tp / (tp + fn),
        }
    result = {}
    for name, values in per_class.items():
        tissue = values[:num_tissue]
        result[f"m{name}"] = float(np.nanmean(tissue)) if np.isfinite(tissue).any() else float("nan")
    result["per_class"] = {name: [float(v) for v in values[:num_tissue]] for name, values in per_class.items()}
    return result


def confusion_columns(num_classes: int) -> list[str]:
    """Column names of a per-image confusion matrix flattened row-major: ``cm_t{truth}_p{prediction}``."""
    return [f"cm_t{truth}_p{pred}" for truth in range(num_classes) for pred in range(num_classes)]


def confusion_classes(frame) -> int:
    """The number of classes of the per-image confusion columns of ``frame`` (a DataFrame of one dataset's
    per_image.csv rows, or several datasets', where columns only another dataset has are empty)."""
    return sum(1 for column in frame.columns
               if str(column).startswith("cm_t0_p") and frame[column].notna().all())


class SegmentationMeter:
    """Accumulates both protocols' confusion matrices and per-image scores over a split.

    ``update(pred, target, names)`` with pred, target (B, H, W) integer tensors (pred in 0..K-1, target in
    0..K, K the background). ``summary() gives both protocols; ``per_image()`` a row per image (primary protocol): its
    scores, scored pixels and confusion matrix (:func:`confusion_columns`), from which a resampled
    split's confusion matrix is summed (:func:`pathmamba.reporting.stats.compare_split_level`).
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = {
            "ignore_background": torch.zeros(num_classes, num_classes, dtype=torch.float64),
            "with_background": torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.float64),
        }
        self.rows: list[dict] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor, names: list[str] | None = None) -> None:
        pred, target = pred.cpu(), target.cpu()
        per_image = per_image_confusion(pred, target, self.num_classes, ignore_index=self.num_classes)
        self.confusion["ignore_background"] += per_image.sum(0)
        self.confusion["with_background"] += confusion_matrix(pred, target, self.num_classes + 1, None)
        for i, cm in enumerate(per_image):
            scores = scores_from_confusion(cm, self.num_classes)
            row = {"image": names[i] if names else str(len(self.rows))}
            row.update({metric: scores[metric] for metric in METRICS})
            row["pixels"] = int(cm.sum())
            row.update(zip(confusion_columns(self.num_classes), cm.long().reshape(-1).tolist(), strict=True))
            self.rows.append(row)

    def summary(self) -> dict:
        result = {}
        for protocol, cm in self.confusion.items():
            result[protocol] = scores_from_confusion(cm, self.num_classes)
            result[protocol]["confusion"] = cm.long().tolist()
        return result

    def per_image(self) -> list[dict]:
        return list(self.rows)
