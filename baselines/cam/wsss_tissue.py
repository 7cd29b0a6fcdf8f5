"""WSSS-Tissue (Han et al., MedIA 2022): multi-layer pseudo-supervision, both stages in one method.

Stage 1 (epochs 1..``stage1_epochs``): the multi-label ResNet classifier trained with progressive
dropout attention: positions whose class activation (normalised per class, image labels only) exceeds
gamma are dropped from the features before pooling; gamma is 1 (nothing dropped) up to epoch
``gamma_start_epoch`` and then multiplied by ``gamma_decay`` per epoch down to ``gamma_floor``.

Stage 2 (later epochs): the classifier is frozen; for every training batch, Grad-CAM at three depths
(layer4, layer3, layer2) restricted to the image's labels gives three pseudo masks (white background
set to the ignored index on the datasets in ``white_background_datasets``, LUAD in the original); a
DeepLabV3+ (segmentation-models-pytorch) is trained on them with the cross-entropy weighted
``pseudo_mask_weights`` (0.6 for the deepest layer, 0.2, 0.2). At test its softmax scores are gated by
the frozen classifier's probabilities (classes below ``gate_threshold`` zeroed).

Difference from the original pipeline (three scripts: train stage 1, write pseudo masks, train stage
2): one registered method trained by the shared engine, so the pseudo masks are computed on the fly
from the frozen stage-1 classifier (on the augmented batch, the same function of the image) instead of
being written once; a stage-2 change retrains stage 1.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from baselines.cam.classifier import MultiLabelResNet
from baselines.cam.toolbox import gate_classes, normalise_maps, white_background_mask
from pathmamba.data.specs import IGNORE_INDEX


def dropout_gamma(epoch: int, start_epoch: int = 2, decay: float = 0.98, floor: float = 0.65) -> float:
    """Progressive dropout attention threshold of ``epoch`` (1-based): 1 up to ``start_epoch``, then
    ``decay`` per epoch, never below ``floor``."""
    return max(floor, decay ** max(0, epoch - start_epoch))


def gradcam_per_layer(classifier: MultiLabelResNet, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Grad-CAM of every class at layer4, layer3 and layer2 of ``classifier`` (deepest first).

    images (B, 3, H, W) -> ([(B, C, h_l, w_l)] * 3 non-negative, logits (B, C)). Gradients are taken
    with respect to the activations only, so no parameter gradient is accumulated.
    """
    stem = classifier.features[:5]  # conv1, bn1, relu, maxpool, layer1
    layer2, layer3, layer4 = classifier.features[5:]
    with torch.no_grad():
        early = stem(images)
    with torch.enable_grad():
        a2 = layer2(early)
        a3 = layer3(a2)
        a4 = layer4(a3)
        logits = classifier.classifier(a4).mean(dim=(2, 3))
        activations = (a4, a3, a2)
        maps = [[] for _ in activations]
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[:, c].sum(), activations, retain_graph=c < logits.shape[1] - 1)
            for layer_maps, activation, grad in zip(maps, activations, grads):
                layer_maps.append(F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)))
    return [torch.stack(layer_maps, dim=1).detach() for layer_maps in maps], logits.detach()


def pseudo_mask(maps: torch.Tensor, targets: torch.Tensor, size: tuple[int, int],
                white: torch.Tensor | None = None) -> torch.Tensor:
    """A pseudo mask from one layer's class maps, restricted to the image's labels.

    maps (B, C, h, w) >= 0, targets (B, C) multi-hot, white (B, 1, H, W) {0, 1} or None ->
    (B, H, W) int64 in 0..C-1, and ``IGNORE_INDEX`` on white background when ``white`` is given.
    """
    scores = normalise_maps(maps, size)
    # Absent classes below any present one (normalised maps are >= 0), so argmax picks a label.
    scores = torch.where(targets[:, :, None, None] > 0, scores, torch.full_like(scores, -1.0))
    mask = scores.argmax(dim=1)
    if white is not None:
        mask = mask.masked_fill(white[:, 0] > 0, IGNORE_INDEX)
    return mask


class WSSSTissue(nn.Module):
    """Stage-1 classifier + stage-2 DeepLabV3+; ``stage`` and ``gamma`` are buffers set per epoch.

    Shapes: images (B, 3, H, W), H and W multiples of 16 -> predict (B, C, H, W).
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, stage1_epochs: int = 20, gamma_start_epoch: int = 2,
                 gamma_decay: float = 0.98, gamma_floor: float = 0.65,
                 pseudo_mask_weights: tuple[float, float, float] = (0.6, 0.2, 0.2),
                 segmenter_encoder: str = "resnet101", segmenter_weights: str | None = None,
                 decoder_channels: int = 256, gate_threshold: float = 0.1, white_threshold: float = 0.85,
                 white_background_datasets: tuple[str, ...] = ("luad-histoseg", "synthetic-luad")):
        super().__init__()
        if len(pseudo_mask_weights) != 3:
            raise ValueError(f"wsss-tissue: pseudo_mask_weights needs 3 values (layer4, layer3, layer2), "
                             f"got {pseudo_mask_weights!r}")
        self.classifier = MultiLabelResNet(num_classes, backbone, pretrained, output_stride, width)
        self.segmenter = smp.DeepLabV3Plus(encoder_name=segmenter_encoder, encoder_weights=segmenter_weights,
                                           classes=num_classes, decoder_channels=decoder_channels)
        self.stage1_epochs = stage1_epochs
        self.gamma_schedule = {"start_epoch": gamma_start_epoch, "decay": gamma_decay, "floor": gamma_floor}
        self.pseudo_mask_weights = tuple(pseudo_mask_weights)
        self.gate_threshold, self.white_threshold = gate_threshold, white_threshold
        self.white_background_datasets = tuple(white_background_datasets)
        self.white_background = False  # set per dataset by on_epoch_start
        self.register_buffer("stage", torch.ones((), dtype=torch.long))
        self.register_buffer("gamma", torch.ones(()))

    def on_epoch_start(self, epoch: int, loader: DataLoader, device: torch.device, dataset: str) -> None:
        self.stage.fill_(1 if epoch <= self.stage1_epochs else 2)
        self.gamma.fill_(dropout_gamma(epoch, **self.gamma_schedule))
        self.white_background = dataset in self.white_background_datasets

    def train(self, mode: bool = True):
        """In stage 2 the frozen classifier stays in eval mode (its batch-norm statistics are fixed)."""
        super().train(mode)
        if int(self.stage) == 2:
            self.classifier.eval()
        return self

    def stage1_loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of the classifier with the most activated positions (above gamma) dropped."""
        features = self.classifier.features(images)
        maps = self.classifier.classifier(features)
        attention = (normalise_maps(maps.detach(), maps.shape[-2:]) * targets[:, :, None, None]).amax(dim=1, keepdim=True)
        kept = features * (attention <= self.gamma).to(features.dtype)
        loss = F.binary_cross_entropy_with_logits(self.classifier.classifier(kept).mean(dim=(2, 3)), targets)
        return loss, {"stage": 1.0, "gamma": float(self.gamma), "bce": float(loss.detach())}

    def pseudo_masks(self, images: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Three pseudo masks (B, H, W) int64, layer4 first, from the frozen classifier."""
        maps, _ = gradcam_per_layer(self.classifier, images)
        white = white_background_mask(images, self.white_threshold) if self.white_background else None
        return [pseudo_mask(layer_maps, targets, images.shape[-2:], white) for layer_maps in maps]

    def stage2_loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of DeepLabV3+ against the three pseudo masks, weighted 0.6 / 0.2 / 0.2."""
        masks = self.pseudo_masks(images, targets)
        logits = self.segmenter(images)
        terms = [F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX) for mask in masks]
        loss = sum(weight * term for weight, term in zip(self.pseudo_mask_weights, terms))
        parts = {"stage": 2.0, **{f"ce_{name}": float(term.detach())
                                  for name, term in zip(("layer4", "layer3", "layer2"), terms)}}
        return loss, parts

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if int(self.stage) == 1:
            return self.stage1_loss(images, targets)
        return self.stage2_loss(images, targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 2: DeepLabV3+ softmax gated by the classifier (B, C, H, W). During stage 1 (model
        selection only sees stage-1 epochs then) the classifier's gated class activation maps."""
        maps = self.classifier.class_maps(images)
        probabilities = torch.sigmoid(maps.mean(dim=(2, 3)))
        if int(self.stage) == 1:
            return gate_classes(normalise_maps(maps, images.shape[-2:]), probabilities, self.gate_threshold)
        scores = torch.softmax(self.segmenter(images), dim=1)
        return gate_classes(scores, probabilities, self.gate_threshold)
