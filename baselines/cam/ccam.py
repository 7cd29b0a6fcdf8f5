"""C-CAM (Chen et al., CVPR 2022): causal CAM with a category chain and an anatomy chain.

Category-causality chain: the coarse class maps M0 of the classifier give a soft coarse mask
P = sigmoid(M0); each class's context vector is the P-weighted mean of the features; the attention
map is the cosine similarity of every position's feature to each class context; a learnt 1x1 fusion of
[M0, attention] gives the refined maps M1. Both M0 and M1 are trained with the image-level BCE.

Anatomy-causality chain: the original's prior is organ shape, which histology patches do not have.
Here the anatomical prior is the tissue / white-background mask (a documented approximation): the
pixel-level foreground max_c sigmoid(M1) is pulled towards the tissue mask by a BCE weighted by
``anatomy_weight``. The prior acts in training only: masks are the gated refined maps, as CAM's (zeroing
them on white-looking pixels sent those pixels, tissue included, to class 0 whether kept or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.cam.cam import CAMClassifier
from baselines.cam.classifier import image_logits
from baselines.cam.toolbox import white_background_mask


class CCAM(CAMClassifier):
    """Shapes: images (B, 3, H, W) -> features (B, F, h, w) -> coarse and refined maps (B, C, h, w)."""

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5, anatomy_weight: float = 1.0,
                 white_threshold: float = 0.85, scales: tuple[float, ...] = (1.0,), flip: bool = False):
        super().__init__(num_classes, backbone, pretrained, output_stride, width, threshold, scales, flip)
        self.anatomy_weight, self.white_threshold = anatomy_weight, white_threshold
        self.fusion = nn.Conv2d(2 * num_classes, num_classes, kernel_size=1)
        # Start as the identity on M0, so the refined chain begins where CAM is.
        with torch.no_grad():
            self.fusion.weight.zero_()
            self.fusion.bias.zero_()
            self.fusion.weight[torch.arange(num_classes), torch.arange(num_classes)] = 1.0

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse M0, refined M1), each (B, C, h, w)."""
        features = self.features(images)
        coarse = self.classifier(features)
        weights = torch.sigmoid(coarse.float()).flatten(2)  # (B, C, hw); float32, see image_logits
        flat = features.flatten(2)  # (B, F, hw)
        context = torch.einsum("bcn,bfn->bcf", weights, flat) / weights.sum(dim=2, keepdim=True).clamp_min(1e-6)
        attention = torch.einsum("bcf,bfn->bcn", F.normalize(context, dim=2), F.normalize(flat, dim=1))
        refined = self.fusion(torch.cat([coarse, attention.view_as(coarse)], dim=1))
        return coarse, refined

    def tissue_prior(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Fraction of tissue (non-white) pixels per cell of a ``size`` grid: (B, 1, *size) in [0, 1]."""
        return 1.0 - F.adaptive_avg_pool2d(white_background_mask(images, self.white_threshold), size)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of coarse and refined image logits + anatomy_weight x BCE(foreground, tissue prior)."""
        coarse, refined = self.maps(images)
        category = (F.binary_cross_entropy_with_logits(image_logits(coarse), targets)
                    + F.binary_cross_entropy_with_logits(image_logits(refined), targets))
        # sigmoid is monotone: max of logits; float32 for the BCE, as in image_logits
        foreground_logit = refined.float().amax(dim=1, keepdim=True)
        anatomy = F.binary_cross_entropy_with_logits(foreground_logit, self.tissue_prior(images, refined.shape[-2:]))
        loss = category + self.anatomy_weight * anatomy
        return loss, {"category": float(category.detach()), "anatomy": float(anatomy.detach())}

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The refined maps M1 (B, C, h, w): what :class:`CAMClassifier` gates, normalises and argmaxes."""
        return self.maps(images)[1]
