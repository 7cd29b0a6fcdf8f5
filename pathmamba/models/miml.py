"""The MIML branch of PathMamba (paper Sec. 2.1; docs/design.md §5.1): pixels are the instances.

A ResNet trunk (stem + layer1, layer2, layer3 by default) with a 1x1 side classifier after each stage;
each side map is upsampled bilinearly to the input size, and the pixel-level map Y' is their weighted
sum. As docs/design.md §8.1 chooses, side maps have one channel per class (the paper's single-channel map is
the per-class saliency max over them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_resnet, resnet_stages, stage_channels


class MIMLBranch(nn.Module):
    """(B, 3, H, W) -> Y' logits (B, m, H, W) and the side logits, each (B, m, H, W), in float32.

    ``side_weights`` has one weight per stage used (1-4 stages of the ResNet, 3 in the paper).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str = "none",
        side_weights: Sequence[float] = (0.2, 0.35, 0.45),
        width: int = 64,
    ):
        super().__init__()
        depth = len(side_weights)
        # Only the used stages are kept as submodules: layer4 and fc would never get a gradient.
        self.stages = resnet_stages(build_resnet(backbone, pretrained, width), depth)
        self.side_classifiers = nn.ModuleList(
            nn.Conv2d(c, num_classes, 1) for c in stage_channels(backbone, depth, width)
        )
        self.side_weights = tuple(float(w) for w in side_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[-2:]
        sides = []
        for stage, classifier in zip(self.stages, self.side_classifiers, strict=True):
            x = stage(x)
            # Logits leave in float32: under bf16 autocast the upsampling and the weighted sum would
            # round them to bf16 once more (no-op casts in float32).
            logits = classifier(x).float()
            sides.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        fused = sum(w * s for w, s in zip(self.side_weights, sides, strict=True))
        return fused, sides
