"""HistoSegNet (Chan et al., ICCV 2019): Grad-CAM of the predicted classes, turned into a segmentation by
a white-background map, an "other" map, class subtraction and a dense CRF."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

from baselines.cam.classifier import MultiLabelResNet
from baselines.cam.crf import CRFSettings, dense_crf
from baselines.cam.gradcam import grad_cam_maps
from baselines.cam.toolbox import gate_classes
from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD


def to_rgb255(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: (B, 3, H, W) -> (B, 3, H, W) float on the 0..255 scale."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255


def background_map(rgb255: torch.Tensor, scale: float = 0.75, slope: float = 4.0, level: float = 240.0,
                   sigma: float = 2.0) -> torch.Tensor:
    """HistoSegNet's white-background score ``scale * sigmoid(slope * (mean RGB - level))``, smoothed by a
    Gaussian of ``sigma`` pixels: (B, 3, H, W) on 0..255 -> (B, 1, H, W), ~0.75 on glass, ~0 on tissue."""
    score = scale * torch.sigmoid(slope * (rgb255.mean(dim=1, keepdim=True) - level))
    radius = max(1, round(3 * sigma))
    return gaussian_blur(score, kernel_size=2 * radius + 1, sigma=sigma)


def subtract_other_classes(maps: torch.Tensor) -> torch.Tensor:
    """Class subtraction: each map minus the largest of the other maps at that pixel, clipped at 0.

    (B, C, H, W) -> (B, C, H, W). Where one class leads, it keeps its margin and the others drop to 0,
    so overlapping activations of similar classes no longer both claim a pixel.
    """
    top2 = maps.topk(2, dim=1).values
    is_top = maps >= top2[:, :1]
    others_max = torch.where(is_top, top2[:, 1:2], top2[:, :1])
    return (maps - others_max).clamp_min(0)


class HistoSegNet(MultiLabelResNet):
    """A :class:`MultiLabelResNet` whose ``predict`` runs HistoSegNet's post-processing.

    Per image: Grad-CAM maps of the classes whose probability reaches ``threshold`` (the top class
    always), class subtraction among them, then a dense CRF over C + 2 labels (the C tissue maps, the
    white-background map and ``other_scale * (1 - max tissue map)``). The scores are the CRF marginals
    of the C tissue labels, absent classes zeroed; background pixels are not scored by the metric.
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5, other_scale: float = 0.05,
                 background_scale: float = 0.75, background_sigma: float = 2.0,
                 crf: dict | None = None):
        super().__init__(num_classes, backbone, pretrained, output_stride, width)
        self.threshold = threshold
        self.other_scale = other_scale
        self.background_scale = background_scale
        self.background_sigma = background_sigma
        try:
            self.crf_settings = CRFSettings(**dict(crf or {}))
        except TypeError as error:
            raise ValueError(f"histosegnet: bad 'crf' settings {crf!r} ({error}); allowed keys: "
                             f"{', '.join(CRFSettings.__dataclass_fields__)}") from None

    def label_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CRF's input maps (B, C + 2, H, W) in [0, 1] and the class probabilities (B, C)."""
        self.eval()
        with torch.no_grad():
            probabilities = torch.sigmoid(self(images.float()))
        cams = grad_cam_maps(self, [self.features[-1]], images, self.num_classes)
        cams = gate_classes(cams, probabilities, self.threshold)
        other = self.other_scale * (1 - cams.amax(dim=1, keepdim=True))
        background = background_map(to_rgb255(images.float()), self.background_scale,
                                    sigma=self.background_sigma)
        return torch.cat([subtract_other_classes(cams), background, other], dim=1), probabilities

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W): CRF marginals of the tissue labels; the mask is their argmax over C."""
        maps, probabilities = self.label_maps(images)
        rgb = to_rgb255(images.float()).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        marginals = np.stack([dense_crf(np.ascontiguousarray(image), label_maps, self.crf_settings)
                              for image, label_maps in zip(rgb, maps.cpu().numpy())])
        scores = torch.from_numpy(marginals[:, : self.num_classes]).to(images.device)
        return gate_classes(scores, probabilities, self.threshold)
