"""WSSS-Tissue (Han et al., MedIA 2022): multi-layer pseudo-supervision in two stages.

Stage 1 (:class:`WSSSTissueClassifier`, its own training run): the multi-label ResNet classifier trained
with progressive dropout attention: positions whose class activation (normalised per class, image labels
only) exceeds gamma are dropped from the features before pooling; gamma is 1 (nothing dropped) up to
epoch ``gamma_start_epoch`` and then multiplied by ``gamma_decay`` per epoch down to ``gamma_floor``.

Pseudo masks (written once, by ``python -m pathmamba pseudo-masks``, a workflow rule of its own): for
every training image, Grad-CAM of the stage-1 classifier at three depths (layer4, layer3, layer2)
restricted to the image's labels gives three masks; white background is set to the ignored index on the
datasets in ``white_background_datasets`` (LUAD in the original).

Stage 2 (:class:`WSSSTissue`, the method of the tables): a DeepLabV3+ (segmentation-models-pytorch)
trained on the three pseudo masks with the cross-entropy weighted ``pseudo_mask_weights`` (0.6 for the
deepest layer, 0.2, 0.2). At test its softmax scores are gated by the frozen stage-1 classifier's
probabilities (classes below ``gate_threshold`` zeroed).

As in the original's three scripts (train stage 1, write pseudo masks, train stage 2), the stages are
separate jobs: a stage-2 change does not retrain stage 1 or rewrite the pseudo masks.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from baselines.cam.cam import CAMClassifier
from baselines.cam.classifier import MultiLabelResNet, image_logits
from baselines.cam.toolbox import gate_classes, normalise_maps, white_background_mask
from baselines.segmenters import smp_network
from pathmamba.data.specs import IGNORE_INDEX

#: The classifier layers whose Grad-CAM gives a pseudo mask, deepest first (the order of the loss weights).
PSEUDO_MASK_LAYERS = ("layer4", "layer3", "layer2")


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
        # The activations need a graph even when the classifier's parameters are frozen.
        early.requires_grad_(True)
        a2 = layer2(early)
        a3 = layer3(a2)
        a4 = layer4(a3)
        logits = image_logits(classifier.classifier(a4))
        activations = (a4, a3, a2)
        maps = [[] for _ in activations]
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[:, c].sum(), activations, retain_graph=c < logits.shape[1] - 1)
            for layer_maps, activation, grad in zip(maps, activations, grads):
                # float32 weights and sum: under bf16 autocast they would round to 8 significant bits
                weights = grad.float().mean(dim=(2, 3), keepdim=True)
                layer_maps.append(F.relu((weights * activation.float()).sum(dim=1)))
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


class WSSSTissueClassifier(CAMClassifier):
    """Stage 1: a :class:`CAMClassifier` (its gated CAMs select the stage's best epoch on val) trained
    with progressive dropout attention, and the pseudo-mask generator. ``gamma`` is a buffer set per
    epoch, so a resumed run continues the schedule.

    Shapes: images (B, 3, H, W) -> logits (B, C); predict and each pseudo mask at (H, W).
    """

    pseudo_mask_names = PSEUDO_MASK_LAYERS

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5, gamma_start_epoch: int = 2,
                 gamma_decay: float = 0.98, gamma_floor: float = 0.65, white_threshold: float = 0.85,
                 white_background_datasets: tuple[str, ...] = ("luad-histoseg", "synthetic-luad")):
        super().__init__(num_classes, backbone, pretrained, output_stride, width, threshold)
        self.gamma_schedule = {"start_epoch": gamma_start_epoch, "decay": gamma_decay, "floor": gamma_floor}
        self.white_threshold = white_threshold
        self.white_background_datasets = tuple(white_background_datasets)
        self.register_buffer("gamma", torch.ones(()))

    def on_epoch_start(self, epoch: int, loader, device: torch.device, dataset: str) -> None:
        self.gamma.fill_(dropout_gamma(epoch, **self.gamma_schedule))

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of the classifier with the most activated positions (above gamma) dropped."""
        features = self.features(images)
        maps = self.classifier(features)
        attention = (normalise_maps(maps.detach(), maps.shape[-2:]) * targets[:, :, None, None]).amax(dim=1, keepdim=True)
        kept = features * (attention <= self.gamma).to(features.dtype)
        loss = F.binary_cross_entropy_with_logits(image_logits(self.classifier(kept)), targets)
        return loss, {"gamma": float(self.gamma), "bce": float(loss.detach())}

    def pseudo_masks(self, images: torch.Tensor, targets: torch.Tensor, dataset: str) -> list[torch.Tensor]:
        """One pseudo mask (B, H, W) int64 per layer of :data:`PSEUDO_MASK_LAYERS`; white background
        ignored on the datasets in ``white_background_datasets``."""
        maps, _ = gradcam_per_layer(self, images)
        white = (white_background_mask(images, self.white_threshold)
                 if dataset in self.white_background_datasets else None)
        return [pseudo_mask(layer_maps, targets, images.shape[-2:], white) for layer_maps in maps]


class WSSSTissue(nn.Module):
    """Stage 2: DeepLabV3+ trained on the pseudo masks, gated at test by the frozen stage-1 classifier.

    ``stage1_hparams``: the keywords the stage-1 classifier was built with (the engine takes them from the
    stage-1 model file); its weights come from there too (:meth:`init_from_stage1`), never from ImageNet.
    ``segmenter_pretrained``: the DeepLabV3+ encoder's weights, ``"none"``, ``"imagenet"`` or a state-dict
    path (see :func:`baselines.segmenters.smp_network`).
    Shapes: images (B, 3, H, W), H and W multiples of 16; targets of ``loss`` (B, 3, H, W) int64 pseudo
    masks in :data:`PSEUDO_MASK_LAYERS` order -> predict (B, C, H, W).
    """

    def __init__(self, num_classes: int = 4, stage1_hparams: dict[str, Any] | None = None,
                 pseudo_mask_weights: tuple[float, float, float] = (0.6, 0.2, 0.2),
                 segmenter_encoder: str = "resnet101", segmenter_pretrained: str = "none",
                 decoder_channels: int = 256, gate_threshold: float = 0.1):
        super().__init__()
        if len(pseudo_mask_weights) != len(PSEUDO_MASK_LAYERS):
            raise ValueError(f"wsss-tissue: pseudo_mask_weights needs {len(PSEUDO_MASK_LAYERS)} values "
                             f"({', '.join(PSEUDO_MASK_LAYERS)}), got {pseudo_mask_weights!r}")
        self.classifier = WSSSTissueClassifier(num_classes, **{**(stage1_hparams or {}), "pretrained": "none"})
        self.classifier.requires_grad_(False)
        self.segmenter = smp_network(smp.DeepLabV3Plus, segmenter_encoder, segmenter_pretrained, "wsss-tissue",
                                     classes=num_classes, decoder_channels=decoder_channels)
        self.pseudo_mask_weights = tuple(pseudo_mask_weights)
        self.gate_threshold = gate_threshold

    def init_from_stage1(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the trained stage-1 classifier's weights (``state_dict`` of its model file)."""
        self.classifier.load_state_dict(state_dict)

    def train(self, mode: bool = True):
        """The frozen classifier stays in eval mode (its batch-norm statistics are fixed)."""
        super().train(mode)
        self.classifier.eval()
        return self

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of DeepLabV3+ against the three pseudo masks, weighted 0.6 / 0.2 / 0.2."""
        logits = self.segmenter(images).float()  # softmax and cross-entropy in float32 under bf16 autocast
        terms = [F.cross_entropy(logits, targets[:, k], ignore_index=IGNORE_INDEX)
                 for k in range(len(PSEUDO_MASK_LAYERS))]
        loss = sum(weight * term for weight, term in zip(self.pseudo_mask_weights, terms))
        return loss, {f"ce_{name}": float(term.detach()) for name, term in zip(PSEUDO_MASK_LAYERS, terms)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """DeepLabV3+ softmax (B, C, H, W) with the classes the classifier puts below the gate zeroed."""
        probabilities = torch.sigmoid(self.classifier(images))
        scores = torch.softmax(self.segmenter(images).float(), dim=1)
        return gate_classes(scores, probabilities, self.gate_threshold)
