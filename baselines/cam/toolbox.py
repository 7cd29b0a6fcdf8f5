"""Turning class activation maps into segmentation scores, shared by the CAM-family baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD

#: The score a rejected class gets from :func:`gate_classes`: below every kept score (all in [0, 1]),
#: finite so that score checks and flip-averaging (sums of scores) stay finite.
REJECTED_SCORE = -1.0


def multiscale_flip_maps(class_maps: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                         scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Sum over scales (and horizontal flips) of ReLU'd class maps resized to the input size, as the
    multi-scale inference of SC-CAM (``infer_cls.py``: scales 1, 0.5, 1.5, 2, each also flipped).

    ``class_maps``: images (B, 3, h, w) -> raw maps (B, C, h', w'). images (B, 3, H, W) -> (B, C, H, W)
    float32 >= 0, not normalised (callers divide by the per-class maximum, as the original does after
    summing). ``scales=(1,)`` without flip is one plain pass.
    """
    size = images.shape[-2:]
    total = None
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            maps = class_maps(scaled.flip(-1) if flipped else scaled)
            maps = F.relu(maps.float())
            maps = maps.flip(-1) if flipped else maps
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            total = maps if total is None else total + maps
    return total


def class_activation_heatmaps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The heat maps of a model with ``class_maps`` (the CAM family; the registry's heat-map column): its
    class activation maps ReLU'd, resized to the images and divided by each class's maximum, as the CAM
    family's ``predict`` scales them. (B, 3, H, W) -> (B, C, H, W) float32 in [0, 1]."""
    with torch.no_grad():
        maps = multiscale_flip_maps(model.class_maps, images)
    return maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def kept_classes(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """The classes an image-level prediction keeps: probability >= ``threshold``, and always the most
    probable class, so every image gets a prediction. probabilities (B, C) -> (B, C) bool."""
    keep = probabilities >= threshold
    keep[torch.arange(len(keep)), probabilities.argmax(1)] = True
    return keep


def gate_classes(scores: torch.Tensor, probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Scores whose argmax only ever picks a class the image-level prediction keeps.

    scores (B, C, H, W) in [0, 1], probabilities (B, C) -> (B, C, H, W) float32. Rejected classes
    (:func:`kept_classes`) get :data:`REJECTED_SCORE`, below every kept score, so they never win a pixel,
    even where every kept score is 0. Where several kept classes tie for the top score, the one with the
    highest image-level probability wins: the others are lowered by one float step (``nextafter``), which
    leaves every other pixel's scores and argmax unchanged. Zeroing the rejected maps instead, as before,
    gave such ties to the lowest class index, rejected or not.
    """
    keep = kept_classes(probabilities, threshold)[:, :, None, None]
    gated = torch.where(keep, scores.float(), torch.full_like(scores, REJECTED_SCORE, dtype=torch.float32))
    top = gated.amax(dim=1, keepdim=True)
    tied = gated == top
    # Among the tied classes, the most probable one; ties in probability go to the lower index.
    rank = torch.where(tied, probabilities.float()[:, :, None, None], torch.full_like(gated, -1.0))
    winner = F.one_hot(rank.argmax(dim=1), scores.shape[1]).permute(0, 3, 1, 2).bool()
    lowered = torch.nextafter(gated, torch.full_like(gated, -2.0))
    return torch.where(tied & ~winner, lowered, gated)


def white_background_mask(images: torch.Tensor, threshold: float = 0.85) -> torch.Tensor:
    """1 where a pixel is white background (mean RGB above ``threshold`` on the 0..1 scale), else 0.

    images (B, 3, H, W) normalised with the ImageNet mean and std -> (B, 1, H, W) float. Slide
    background in H&E patches is near-white glass; tissue, even pale stroma, is darker.
    """
    return (to_rgb255(images).mean(dim=1, keepdim=True) > 255 * threshold).float()


def to_rgb255(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: (B, 3, H, W) -> (B, 3, H, W) float on the 0..255 scale."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255


def gray_background_mask(images: torch.Tensor, level: float = 200.0, min_size: int = 50) -> torch.Tensor:
    """WSSS-Tissue's LUAD background (``gen_bg_mask`` in its ``tool/infer_utils.py``): gray value
    (OpenCV's 0.299 R + 0.587 G + 0.114 B, rounded to uint8) above ``level``, without the 4-connected
    components of fewer than ``min_size`` pixels (skimage's ``remove_small_objects``, connectivity 1).

    images (B, 3, H, W) ImageNet-normalised -> (B, 1, H, W) float {0, 1}.
    """
    # Imported here: every CAM-family job imports this module, only WSSS-Tissue's LUAD jobs need scipy.
    from scipy import ndimage

    rgb = to_rgb255(images.float()).round().clamp(0, 255)
    gray = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round()
    bright = (gray > level).cpu().numpy()
    kept = np.zeros_like(bright)
    for i, image in enumerate(bright):
        labels, _ = ndimage.label(image)  # default structure: 4-connectivity in 2-D
        sizes = np.bincount(labels.ravel())
        large = sizes >= min_size
        large[0] = False  # label 0 is the dark part
        kept[i] = large[labels]
    return torch.from_numpy(kept).to(images.device, torch.float32)[:, None]
