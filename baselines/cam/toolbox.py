"""Turning class activation maps into segmentation scores, shared by the CAM-family baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD


def normalise_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear upsampling to ``size`` and per-class division by the maximum: (B, C, h, w) ->
    (B, C, H, W) in [0, 1], float32: from bf16 maps (autocast) the scores would be rounded to steps of
    2^-8 near 1, where thresholds such as WSSS-Tissue's dropout gamma compare them."""
    maps = F.interpolate(F.relu(maps.float()), size=size, mode="bilinear", align_corners=False)
    peak = maps.amax(dim=(2, 3), keepdim=True)
    return maps / peak.clamp_min(1e-6)


def gate_classes(maps: torch.Tensor, probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Zero the maps of classes the classifier does not predict (probability below ``threshold``).

    The most probable class is always kept, so every image gets a prediction.
    maps (B, C, H, W), probabilities (B, C) -> (B, C, H, W).
    """
    keep = probabilities >= threshold
    keep[torch.arange(len(keep)), probabilities.argmax(1)] = True
    return maps * keep[:, :, None, None]


def white_background_mask(images: torch.Tensor, threshold: float = 0.85) -> torch.Tensor:
    """1 where a pixel is white background (mean RGB above ``threshold`` on the 0..1 scale), else 0.

    images (B, 3, H, W) normalised with the ImageNet mean and std -> (B, 1, H, W) float. Slide
    background in H&E patches is near-white glass; tissue, even pale stroma, is darker.
    """
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = images * std + mean
    return (rgb.mean(dim=1, keepdim=True) > threshold).float()
