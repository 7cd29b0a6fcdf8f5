"""HistoSegNet (Chan et al., ICCV 2019): Grad-CAM of the predicted classes, turned into a segmentation by
a white-background map, an "other" map, class subtraction and a dense CRF.

Steps and values follow the released code, github.com/lyndonchan/hsn_v1: ``hsn_v1/gradcam.py``
(``grad_cam_batch``: the signed Grad-CAM resized to the image, then ReLU, then divided by its maximum;
``gen_gradcam``: each Grad-CAM scaled by its class's confidence; ``modify_by_htt``: background and
"other" maps; ``get_cs_gradcam``: class subtraction) and ``hsn_v1/densecrf.py`` (CRF over the labels whose
maps are not all zero, argmax over all labels).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from baselines.cam.classifier import MultiLabelResNet, image_logits
from baselines.cam.crf import CRFSettings, dense_crf
from baselines.cam.toolbox import gate_classes, kept_classes, to_rgb255


def signed_grad_cam(features: torch.Tensor, head, num_classes: int) -> torch.Tensor:
    """Grad-CAM before any ReLU or scaling: features A (B, F, h, w), ``head``: A -> (B, C) logits ->
    (B, C, h, w) maps sum_k mean_xy(d logit_c / d A_k) A_k, in float32.

    Only the head is differentiated (the features are a leaf): the gradient with respect to A is all
    Grad-CAM needs. The samples of a batch are independent (the head has no batch statistics), so the
    gradient of the summed logit gives every sample's own. The original also divides the gradient by
    its root mean square; a positive factor that its division by the maximum cancels.
    """
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        features = features.detach().float().requires_grad_(True)
        logits = head(features)
        maps = []
        for c in range(num_classes):
            (grad,) = torch.autograd.grad(logits[:, c].sum(), features, retain_graph=c < num_classes - 1)
            maps.append((grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))
    return torch.stack(maps, dim=1).detach()


def histosegnet_grad_cam(model: MultiLabelResNet, images: torch.Tensor) -> torch.Tensor:
    """HistoSegNet's Grad-CAM of every class of ``model`` at its last ResNet layer (:func:`resized_grad_cam`
    of its features): (B, 3, H, W) -> (B, C, H, W) in [0, 1]."""
    with torch.no_grad():
        features = model.features(images.float())
    return resized_grad_cam(model, features, images.shape[-2:])


def resized_grad_cam(model: MultiLabelResNet, features: torch.Tensor, size) -> torch.Tensor:
    """HistoSegNet's Grad-CAM of every class from the last-layer ``features`` (B, F, h, w) of ``model``, in
    the order of ``grad_cam_batch``: the signed map resized bilinearly to ``size`` (OpenCV's default,
    half-pixel centres), then ReLU, then divided by its maximum (at least 1e-7). -> (B, C, *size) in [0, 1].

    pytorch-grad-cam (``baselines/cam/gradcam.py``) applies ReLU and a min-max scaling on the feature grid
    and resizes after: a different map wherever a positive region borders a negative one.
    """
    cams = signed_grad_cam(features, lambda a: image_logits(model.classifier(a)), model.num_classes)
    cams = F.relu(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))
    return cams / cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-7)


def background_map(rgb255: torch.Tensor, scale: float = 0.75, slope: float = 4.0, level: float = 240.0,
                   sigma: float = 2.0) -> torch.Tensor:
    """HistoSegNet's white-background score ``scale * sigmoid(slope * (mean RGB - level))``, smoothed by a
    Gaussian of ``sigma`` pixels: (B, 3, H, W) on 0..255 -> (B, 1, H, W), ~0.75 on glass, ~0 on tissue."""
    score = scale * torch.sigmoid(slope * (rgb255.mean(dim=1, keepdim=True) - level))
    radius = max(1, round(3 * sigma))
    return gaussian_blur(score, kernel_size=2 * radius + 1, sigma=sigma)


def subtract_other_classes(maps: torch.Tensor, exempt: int | None = None) -> torch.Tensor:
    """Class subtraction: each map minus the largest of the other maps at that pixel, clipped to [0, 1].

    (B, L, H, W) -> (B, L, H, W). Where one label leads, it keeps its margin and the others drop to 0, so
    overlapping activations of similar labels no longer both claim a pixel. ``exempt``: a label (the
    original's "other") that is not subtracted from but still counts in the others' maximum.
    The original (``get_cs_gradcam``) subtracts in place, label by label, so a later label subtracts the
    already reduced earlier maps; this is the simultaneous subtraction the paper describes.
    """
    top2 = maps.topk(2, dim=1).values
    is_top = maps >= top2[:, :1]
    others_max = torch.where(is_top, top2[:, 1:2], top2[:, :1])
    subtracted = (maps - others_max).clamp(0, 1)
    if exempt is not None:
        subtracted[:, exempt] = maps[:, exempt].clamp(0, 1)
    return subtracted


class HistoSegNet(MultiLabelResNet):
    """A :class:`MultiLabelResNet` whose ``predict`` runs HistoSegNet's post-processing.

    Labels: the C tissue classes, then background (index C), then "other" (index C + 1). Per image:
    Grad-CAM maps of the kept classes (probability >= ``threshold``, the top class always), each times its
    probability; the background map; other = ``other_scale`` x (1 - max of the tissue and background
    maps); class subtraction over all C + 2 labels ("other" exempt); a dense CRF over the labels whose
    maps are not all zero. The original's mask is the argmax over all C + 2 CRF marginals.

    Our masks hold the C tissue classes only (the metric has no "no class" prediction; background
    pixels are not scored): a pixel the original gives to background or "other" gets the kept tissue
    class with the highest marginal. :meth:`crf_marginals` gives all C + 2 marginals, so the share of
    such pixels can be measured (``benchmarks/rejected_class_pixels.py``).

    Model selection (the engine's val pass after every epoch) ranks epochs by :meth:`selection_scores`,
    the CRF's input maps without the CRF: the dense CRF runs on one CPU core per image, and in every
    epoch's selection pass the GPU would wait for it (docs/baselines.md, "Model selection").
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
            features = self.features(images.float())
            # self(images) without a second backbone pass: the same operations on the same features
            probabilities = torch.sigmoid(image_logits(self.classifier(features)))
        keep = kept_classes(probabilities, self.threshold)
        cams = resized_grad_cam(self, features, images.shape[-2:])
        # gen_gradcam: the maps of the predicted classes only, each scaled by its confidence score
        cams = cams * (probabilities * keep)[:, :, None, None]
        background = background_map(to_rgb255(images.float()), self.background_scale,
                                    sigma=self.background_sigma)
        # modify_by_htt ("func"): other = 0.05 (1 - max over the maps so far, background included)
        other = self.other_scale * (1 - torch.cat([cams, background], dim=1).amax(dim=1, keepdim=True))
        maps = torch.cat([cams, background, other], dim=1)
        return subtract_other_classes(maps, exempt=self.num_classes + 1), probabilities

    def crf_marginals(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CRF marginals of all C + 2 labels (B, C + 2, H, W), 0 for a label whose map is all zero (the
        original leaves it out of the CRF), and the class probabilities (B, C)."""
        maps, probabilities = self.label_maps(images)
        rgb = to_rgb255(images.float()).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        maps = maps.cpu().numpy()
        marginals = np.zeros_like(maps, dtype=np.float32)
        for i, (image, label_maps) in enumerate(zip(rgb, maps, strict=True)):
            present = label_maps.sum(axis=(1, 2)) > 0
            marginals[i, present] = dense_crf(np.ascontiguousarray(image), label_maps[present], self.crf_settings)
        return torch.from_numpy(marginals).to(images.device), probabilities

    def selection_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W) for model selection: the CRF's input maps of the kept tissue classes (after
        class subtraction), every step on the images' device; ``predict`` without its CRF."""
        maps, probabilities = self.label_maps(images)
        return gate_classes(maps[:, : self.num_classes], probabilities, self.threshold)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W): CRF marginals of the kept tissue classes; the mask is their argmax over C."""
        marginals, probabilities = self.crf_marginals(images)
        return gate_classes(marginals[:, : self.num_classes], probabilities, self.threshold)
