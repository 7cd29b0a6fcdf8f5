"""UNet (Ronneberger et al., MICCAI 2015), the fully supervised reference of the comparison table.

segmentation-models-pytorch's ``Unet`` with a ResNet-50 encoder, trained with pixel-wise cross-entropy.
Pixel labels exist only for the val and test splits of both datasets, so the engine trains it on the
val masks (``supervision="pixel"`` in the registry, a fixed 80/20 split of val for model selection).
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from baselines.segmenters import smp_network


class UNet(nn.Module):
    """smp ``Unet``: images (B, 3, H, W) -> logits (B, C, H, W); H and W multiples of 2^encoder_depth.

    ``pretrained``: ``"none"``, ``"imagenet"`` or the path of a torchvision ResNet state dict (see
    :func:`baselines.segmenters.smp_network`). ``encoder_kwargs`` go to timm encoders only (e.g.
    ``channels`` and ``stem_width`` of ``tu-resnet18`` for a narrow CPU demo model).
    """

    def __init__(self, num_classes: int = 4, encoder: str = "resnet50", pretrained: str = "none",
                 encoder_depth: int = 5, decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                 encoder_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if len(decoder_channels) != encoder_depth:
            raise ValueError(f"unet: decoder_channels needs one entry per encoder stage ({encoder_depth}), "
                             f"got {list(decoder_channels)}")
        self.num_classes = num_classes
        self.net = smp_network(smp.Unet, encoder, pretrained, "unet", encoder_depth=encoder_depth,
                               decoder_channels=tuple(decoder_channels), classes=num_classes,
                               **dict(encoder_kwargs or {}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over pixels; targets (B, H, W) int64, the background (index ``num_classes``) ignored."""
        # Summed, then divided by the scored pixels (at least one), so an all-background batch gives 0,
        # not the NaN of a mean over no pixels. Logits in float32: under bf16 autocast the log-softmax
        # and the sum over pixels would otherwise round to bf16's 8 significant bits.
        summed = F.cross_entropy(self(images).float(), targets, ignore_index=self.num_classes, reduction="sum")
        loss = summed / (targets != self.num_classes).sum().clamp_min(1)
        return loss, {"ce": float(loss.detach())}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C, H, W)."""
        return self(images).float().softmax(1)
