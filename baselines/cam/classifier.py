"""The multi-label ResNet classifier shared by the CAM-family baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pathmamba.models.backbones import build_resnet, reduce_output_stride, stage_channels


def image_logits(class_maps: torch.Tensor) -> torch.Tensor:
    """Global average pooling of class maps, (B, C, h, w) -> (B, C) logits, in float32.

    Under bf16 autocast the maps come in bf16, and a bf16 sigmoid rounds to exactly 1 above a logit of
    about 6.2, with zero gradient; every CAM-family loss and class probability pools through here so that
    the mean, sigmoid and BCE see float32. In float32 the cast is a no-op.
    """
    return class_maps.float().mean(dim=(2, 3))


class MultiLabelResNet(nn.Module):
    """ResNet features -> 1x1 classifier -> global average pooling -> one logit per class.

    A 1x1 convolution applied before pooling equals a linear layer after it, so ``class_maps`` (the
    classifier applied at every position) are exactly Zhou et al.'s class activation maps.

    Shapes: images (B, 3, H, W) -> features (B, F, H/s, W/s) -> logits (B, C), s = ``output_stride``.
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64):
        super().__init__()
        self.num_classes = num_classes
        resnet = reduce_output_stride(build_resnet(backbone, pretrained, width), output_stride)
        self.features = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )
        self.classifier = nn.Conv2d(stage_channels(backbone, width=width)[-1], num_classes, kernel_size=1, bias=False)

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B, C, H/s, W/s), before any ReLU or normalisation."""
        return self.classifier(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image logits (B, C) in float32."""
        return image_logits(self.class_maps(images))

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-label BCE of the image-level logits; targets (B, C) multi-hot."""
        loss = F.binary_cross_entropy_with_logits(self(images), targets)
        return loss, {"bce": float(loss.detach())}
