"""CAM (Zhou et al., CVPR 2016): class activation maps of a multi-label classifier, argmax to a mask."""

from __future__ import annotations

import torch

from baselines.cam.classifier import MultiLabelResNet, image_logits
from baselines.cam.toolbox import gate_classes, normalise_maps


class CAMClassifier(MultiLabelResNet):
    """A :class:`MultiLabelResNet` whose ``predict`` gives gated, normalised class activation maps.

    ``threshold``: classes with a sigmoid probability below it get no pixels (the top class always does).
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5):
        super().__init__(num_classes, backbone, pretrained, output_stride, width)
        self.threshold = threshold

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W) in [0, 1]; the mask is their argmax over C."""
        maps = self.class_maps(images)
        probabilities = torch.sigmoid(image_logits(maps))
        return gate_classes(normalise_maps(maps, images.shape[-2:]), probabilities, self.threshold)
