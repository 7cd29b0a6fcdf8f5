"""CAM (Zhou et al., CVPR 2016): class activation maps of a multi-label classifier, argmax to a mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baselines.cam.classifier import MultiLabelResNet, image_logits
from baselines.cam.toolbox import gate_classes, multiscale_flip_maps


class CAMClassifier(MultiLabelResNet):
    """A :class:`MultiLabelResNet` whose ``predict`` gives gated, normalised class activation maps.

    ``threshold``: classes with a sigmoid probability below it get no pixels (the top class always does).
    ``scales`` / ``flip``: the maps are summed over these input scales (and horizontal flips) before the
    per-class normalisation (SC-CAM's inference); the class probabilities always come from the plain
    scale-1 pass. The default, one scale without flip, is CAM's own single pass.
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5,
                 scales: Sequence[float] = (1.0,), flip: bool = False):
        super().__init__(num_classes, backbone, pretrained, output_stride, width)
        if not scales or any(scale <= 0 for scale in scales):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {scales!r}")
        self.threshold = threshold
        self.scales, self.flip = tuple(float(scale) for scale in scales), bool(flip)

    def segmentation_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw class maps of the plain scale-1 pass (B, C, h, w), for the class probabilities, and the
        maps summed over ``scales`` and flips (B, C, H, W) >= 0, for the masks."""
        maps = self.class_maps(images)
        if self.scales == (1.0,) and not self.flip:
            return maps, multiscale_flip_maps(lambda _: maps, images)
        return maps, multiscale_flip_maps(self.class_maps, images, self.scales, self.flip)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W): kept classes in [0, 1], rejected ones below; the mask is their argmax."""
        maps, summed = self.segmentation_maps(images)
        probabilities = torch.sigmoid(image_logits(maps))
        scores = summed / summed.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return gate_classes(scores, probabilities, self.threshold)
