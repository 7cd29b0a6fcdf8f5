"""The MIML branch of PathMamba (paper Sec. 2.1; docs/design.md §5.1): pixels are the instances.

A ResNet trunk (the paper's ResNet-50) with a 1x1 side classifier after the stages whose output stride
is in ``side_strides``. Where the paper is silent the authors' ``models/mil.py`` (hemo0826/PathMamba)
decides: each side map is upsampled bilinearly (corners aligned) to the input size and passed through
its own sigmoid, and Y' is the weighted sum of these *probabilities* (0.2 / 0.35 / 0.45), at output
strides 2 / 4 / 8 (their VGG16 trunk pools after each of its three stages). On the ResNet those strides
are the stem convolution (2), max-pool + layer1 (4) and layer2 (8). Their trunk itself (VGG16 with
criss-cross attention, from SA-MIL) is not the paper's; the paper's ResNet-50 is kept. As docs/design.md
§8.1 chooses, side maps have one channel per class (the paper's single-channel map is the per-class
saliency max over them). The authors train the side classifiers at lr / 100 (``functions/train.py``,
parameter groups of their own); ``side_lr_scale`` sets that multiple (pathmamba/engine/optim.py's ``_lr_scale``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

from pathmamba.models.backbones import build_resnet

#: Output stride of each ResNet segment of :func:`resnet_segments`, in order.
SEGMENT_STRIDES = (2, 4, 8, 16, 32)


def resnet_segments(model: ResNet, width: int, bottleneck: bool) -> tuple[list[nn.Module], list[int]]:
    """The ResNet cut where its output stride changes: stem convolution (stride 2), max-pool + layer1
    (4), layer2 (8), layer3 (16), layer4 (32); with each segment's output channels."""
    expansion = 4 if bottleneck else 1
    segments = [nn.Sequential(model.conv1, model.bn1, model.relu), nn.Sequential(model.maxpool, model.layer1),
                model.layer2, model.layer3, model.layer4]
    channels = [width] + [width * expansion * 2**i for i in range(4)]
    return segments, channels


class MIMLBranch(nn.Module):
    """(B, 3, H, W) -> Y' (B, m, H, W) and the side maps, each (B, m, H, W): probabilities in float32.

    ``side_weights`` and ``side_strides`` have one entry per side output; the strides are increasing
    values of :data:`SEGMENT_STRIDES`, and the trunk runs only as far as the last of them.
    ``side_lr_scale``: the side classifiers' learning rate as a multiple of the model's.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str = "none",
        side_weights: Sequence[float] = (0.2, 0.35, 0.45),
        width: int = 64,
        side_strides: Sequence[int] = (2, 4, 8),
        side_lr_scale: float = 0.01,
    ):
        super().__init__()
        if not side_lr_scale > 0:
            raise ValueError(f"MIML: side_lr_scale={side_lr_scale!r}; expected a multiple > 0 of the learning rate")
        side_strides = tuple(int(s) for s in side_strides)
        if len(side_strides) != len(side_weights) or list(side_strides) != sorted(set(side_strides)) \
                or not set(side_strides) <= set(SEGMENT_STRIDES):
            raise ValueError(f"MIML: side_strides={side_strides!r} must be increasing values of "
                             f"{SEGMENT_STRIDES}, one per side weight ({len(side_weights)})")
        segments, channels = resnet_segments(build_resnet(backbone, pretrained, width), width,
                                             bottleneck=backbone not in ("resnet18", "resnet34"))
        depth = SEGMENT_STRIDES.index(side_strides[-1]) + 1
        # Only the segments used are submodules: the rest would never get a gradient.
        self.stages = nn.ModuleList(segments[:depth])
        self.side_at = tuple(SEGMENT_STRIDES.index(s) for s in side_strides)
        self.side_classifiers = nn.ModuleList(nn.Conv2d(channels[i], num_classes, 1) for i in self.side_at)
        self.side_classifiers._lr_scale = float(side_lr_scale)
        self.side_weights = tuple(float(w) for w in side_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[-2:]
        sides = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.side_at:
                classifier = self.side_classifiers[self.side_at.index(i)]
                # Logits leave in float32: under bf16 autocast the upsampling, the sigmoid and the weighted
                # sum would round them to bf16 once more (no-op casts in float32). mil.py's order: 1x1
                # convolution, upsampling with aligned corners, sigmoid.
                logits = F.interpolate(classifier(x).float(), size=size, mode="bilinear", align_corners=True)
                sides.append(torch.sigmoid(logits))
        fused = sum(w * s for w, s in zip(self.side_weights, sides, strict=True))
        return fused, sides
