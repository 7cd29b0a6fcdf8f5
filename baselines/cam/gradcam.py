"""Grad-CAM (Selvaraju et al., ICCV 2017) on the shared classifier, as the ``grad-cam`` package computes
it, every class from one forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.cam.cam import CAMClassifier
from baselines.cam.toolbox import gate_classes


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` per (image, class) map: minus its minimum, over 1e-7 + its new
    maximum."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (1e-7 + maps.amax(dim=(-2, -1), keepdim=True))


def grad_cam_maps(model: nn.Module, target_layers: list[nn.Module], images: torch.Tensor,
                  num_classes: int) -> torch.Tensor:
    """Grad-CAM of every class: (B, 3, H, W) images -> (B, C, H, W) maps in [0, 1] on the images' device.

    ``model(images)`` must give (B, C) logits. pytorch-grad-cam's GradCAM, computed in torch: the
    activations of each target layer weighted by the spatial mean of the gradient of the class's logit,
    summed, ReLU, min-max scaled per map, resized bilinearly to H x W; the mean over the target layers
    min-max scaled again. The package runs the whole forward and backward once per class; here one
    forward serves all classes, and each class's gradient comes from a backward through the layers
    after the target layers only, the graph kept between classes. ``tests/test_baselines.py`` checks
    the result against the package's to float precision.

    Gradients are needed, so this runs under ``torch.enable_grad`` even when called inside
    ``torch.no_grad`` (the engine's evaluation), in float32 as the package does (it converts to numpy,
    which has no bfloat16), with the model in eval mode as the package leaves it, and leaves no
    parameter gradients behind. Only the target layers' parameters require gradients meanwhile: their
    outputs then carry the gradient Grad-CAM needs, and nothing before them is recorded. So each target
    layer must have parameters (a ResNet stage, a convolution).
    """
    for layer in target_layers:
        if not any(True for _ in layer.parameters()):
            raise ValueError(f"grad_cam_maps: target layer {type(layer).__name__} has no parameters; "
                             "choose a layer with weights, e.g. a ResNet stage")
    images = images.float()
    activations = {}
    hooks = [layer.register_forward_hook(lambda module, inputs, output, i=i: activations.__setitem__(i, output))
             for i, layer in enumerate(target_layers)]
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in target_layers:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        model.eval()
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            logits = model(images)
            outputs = [activations[i] for i in range(len(target_layers))]
            weights = []  # per class: the spatial mean of the gradient at each target layer, (B, F, 1, 1)
            for c in range(num_classes):
                grads = torch.autograd.grad(logits[:, c].sum(), outputs, retain_graph=c < num_classes - 1)
                weights.append([grad.mean(dim=(2, 3), keepdim=True) for grad in grads])
        per_layer = []
        for i, output in enumerate(outputs):
            output = output.detach()
            cams = torch.stack([(w[i] * output).sum(dim=1) for w in weights], dim=1)  # (B, C, h, w)
            cams = _min_max(F.relu(cams))
            per_layer.append(F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False))
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    return _min_max(F.relu(torch.stack(per_layer)).mean(dim=0))


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
