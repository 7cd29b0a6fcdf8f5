"""Grad-CAM (Selvaraju et al., ICCV 2017) with the ``grad-cam`` package on the shared classifier."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from baselines.cam.cam import CAMClassifier
from baselines.cam.toolbox import gate_classes


def grad_cam_maps(model: nn.Module, target_layers: list[nn.Module], images: torch.Tensor,
                  num_classes: int) -> torch.Tensor:
    """Grad-CAM of every class: (B, 3, H, W) images -> (B, C, H, W) maps in [0, 1] on the images' device.

    ``model(images)`` must give (B, C) logits. pytorch-grad-cam weights the activations of
    ``target_layers`` by the spatial mean of the logit's gradient, applies ReLU, resizes to H x W and
    scales each map to [0, 1] (min-max per image and class). One forward and backward pass per class.
    Gradients are needed, so this runs under ``torch.enable_grad`` even when called inside
    ``torch.no_grad`` (the engine's evaluation), in float32 (the package converts to numpy, which has no
    bfloat16), and leaves no parameter gradients behind.

    Only the target layers' parameters require gradients meanwhile: their outputs then still carry the
    gradient Grad-CAM needs, and the backward pass stops at the target layers instead of running through
    the whole backbone. So each target layer must have parameters (a ResNet stage, a convolution).
    """
    for layer in target_layers:
        if not any(True for _ in layer.parameters()):
            raise ValueError(f"grad_cam_maps: target layer {type(layer).__name__} has no parameters; "
                             "choose a layer with weights, e.g. a ResNet stage")
    maps = []
    images = images.float()
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in target_layers:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False), \
                GradCAM(model=model, target_layers=target_layers) as cam:
            for c in range(num_classes):
                maps.append(cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images)))
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.stack(maps, axis=1)).to(images.device)


def last_layer_grad_cam(model: CAMClassifier, images: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of every class at the classifier's last ResNet layer, before any gating (what
    :meth:`GradCAMClassifier.predict` gates; the registry's heat-map column): (B, 3, H, W) -> (B, C, H, W)
    in [0, 1]."""
    return grad_cam_maps(model, [model.features[-1]], images, model.num_classes)


class GradCAMClassifier(CAMClassifier):
    """A :class:`CAMClassifier` (same keywords, single scale only) whose ``predict`` gives gated Grad-CAM
    maps of its last ResNet layer instead of class activation maps.

    With global average pooling and a 1x1 classifier, Grad-CAM of the last layer is CAM up to the
    normalisation (Selvaraju et al., ICCV 2017, Sec. 3.1; ``tests/test_baselines.py`` checks it), so this
    is a reference row beside CAM, not a row of PathMamba's Table 1 (docs/baselines.md).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scales != (1.0,) or self.flip:
            raise ValueError(f"gradcam: multi-scale / flip inference is not implemented, got scales "
                             f"{self.scales} and flip {self.flip}")

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, C, H, W) in [0, 1]; the mask is their argmax over C."""
        self.eval()
        with torch.no_grad():
            probabilities = torch.sigmoid(self(images.float()))
        return gate_classes(last_layer_grad_cam(self, images), probabilities, self.threshold)
