"""WSSS-Tissue (Han et al., MedIA 2022): multi-layer pseudo-supervision in two stages.

Each step follows the original code, github.com/ChuHan89/WSSS-Tissue:

Stage 1 (:class:`WSSSTissueClassifier`, its own training run; ``1_train_stage1.py``,
``network/resnet38_cls.py``, ``tool/ADL_module.py``): the multi-label ResNet classifier with channel
dropout (``Dropout2d``) on the features before pooling, and progressive dropout attention (PDA) from
epoch ``pda_start_epoch`` on: the features are multiplied by the mean over all classes of their ReLU'd
CAMs, in which every value above gamma x that class's maximum is set to 0. gamma starts at 1 and is
multiplied by ``gamma_decay`` after every epoch while it is above ``gamma_floor``.

Pseudo masks (written once, by ``python -m pathmamba pseudo-masks``, a workflow rule of its own;
``2_generate_PM.py``, ``tool/infer_fun.py: create_pseudo_mask``, ``tool/gradcam.py``): for every training
image, Grad-CAM of the stage-1 classifier at three depths (layer4, layer3, layer2) without ReLU, resized
to the image, min-max normalised over all classes together, restricted to the image's labels; on the
datasets whose description says their background is white glass (``background.white_glass``: LUAD in the
original) background from a gray threshold (``gen_bg_mask``) is set to the ignored index.

Stage 2 (:class:`WSSSTissue`, the method of the tables; ``3_train_stage2.py``): a DeepLabV3+
(segmentation-models-pytorch) trained on the three pseudo masks with the cross-entropy weighted
``pseudo_mask_weights`` (0.6 for the deepest layer, 0.2, 0.2). At test its softmax scores are gated by
the frozen stage-1 classifier's probabilities (classes below ``gate_threshold`` rejected).

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
from baselines.cam.toolbox import gate_classes, gray_background_mask
from baselines.segmenters import smp_network
from pathmamba.data.specs import DatasetSpec

#: The classifier layers whose Grad-CAM gives a pseudo mask, deepest first (the order of the loss weights).
PSEUDO_MASK_LAYERS = ("layer4", "layer3", "layer2")


def dropout_gamma(epoch: int, decay: float = 0.98, floor: float = 0.65) -> float:
    """PDA's gamma during ``epoch`` (1-based): 1 in epoch 1, then multiplied by ``decay`` after each
    epoch while above ``floor`` (``1_train_stage1.py``: ``if model.gama > 0.65: model.gama *= 0.98``)."""
    gamma = 1.0
    for _ in range(epoch - 1):
        if gamma > floor:
            gamma *= decay
    return gamma


def dropout_attention(cams: torch.Tensor, gamma: float) -> torch.Tensor:
    """PDA's attention (``Attention_Module`` in ``tool/ADL_module.py``): the mean over classes of the
    ReLU'd CAMs with every value above gamma x the class's maximum (per image) set to 0.

    cams (B, C, h, w) raw class maps -> (B, 1, h, w) >= 0, differentiable (the original does not detach).
    """
    cams = F.relu(cams)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    dropped = torch.where(cams > gamma * peak, torch.zeros_like(cams), cams)
    return dropped.mean(dim=1, keepdim=True)


def gradcam_per_layer(classifier: MultiLabelResNet, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Grad-CAM of every class at layer4, layer3 and layer2 of ``classifier`` (deepest first).

    images (B, 3, H, W) -> ([(B, C, h_l, w_l)] * 3 signed, logits (B, C)): gradient-weighted sums of the
    activations without ReLU, as the original's ``tool/gradcam.py``. Gradients are taken with respect to
    the activations only, so no parameter gradient is accumulated.
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
            for layer_maps, activation, grad in zip(maps, activations, grads, strict=True):
                # float32 weights and sum: under bf16 autocast they would round to 8 significant bits
                weights = grad.float().mean(dim=(2, 3), keepdim=True)
                layer_maps.append((weights * activation.float()).sum(dim=1))
    return [torch.stack(layer_maps, dim=1).detach() for layer_maps in maps], logits.detach()


def pseudo_mask(maps: torch.Tensor, targets: torch.Tensor, size: tuple[int, int],
                background: torch.Tensor | None = None) -> torch.Tensor:
    """A pseudo mask from one layer's class maps (``create_pseudo_mask`` in ``tool/infer_fun.py``).

    maps (B, C, h, w) signed Grad-CAMs, targets (B, C) multi-hot, background (B, 1, H, W) {0, 1} or None
    -> (B, H, W) int64 in 0..C-1, and C (the ignored background index) on background when ``background``
    is given.
    The maps are resized to ``size`` and min-max normalised over all classes of an image together (one
    range, so the classes keep their relative strength), then the argmax is taken over the image's labels.
    """
    maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    high = maps.amax(dim=(1, 2, 3), keepdim=True)
    scores = (maps - low) / (high - low).clamp_min(1e-12)
    # Classes not in the labels below every labelled one (normalised scores are in [0, 1]).
    scores = torch.where(targets[:, :, None, None] > 0, scores, torch.full_like(scores, -1.0))
    mask = scores.argmax(dim=1)
    if background is not None:
        mask = mask.masked_fill(background[:, 0] > 0, targets.shape[1])
    return mask


class WSSSTissueClassifier(CAMClassifier):
    """Stage 1: a :class:`CAMClassifier` (its gated CAMs select the stage's best epoch on val) trained
    with channel dropout and progressive dropout attention, and the pseudo-mask generator. ``gamma`` and
    ``pda`` (whether PDA is on) are buffers set per epoch, so a resumed run continues the schedule.

    Shapes: images (B, 3, H, W) -> logits (B, C); predict and each pseudo mask at (H, W).
    """

    pseudo_mask_names = PSEUDO_MASK_LAYERS

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5, feature_dropout: float = 0.5,
                 pda_start_epoch: int = 4, gamma_decay: float = 0.98, gamma_floor: float = 0.65,
                 background_level: float = 200.0, background_min_size: int = 50):
        super().__init__(num_classes, backbone, pretrained, output_stride, width, threshold)
        if not 0 <= feature_dropout < 1 or pda_start_epoch < 1:
            raise ValueError(f"wsss-tissue: feature_dropout must be in [0, 1) and pda_start_epoch >= 1, got "
                             f"{feature_dropout} and {pda_start_epoch}")
        self.feature_dropout = feature_dropout
        self.pda_start_epoch = pda_start_epoch
        self.gamma_schedule = {"decay": gamma_decay, "floor": gamma_floor}
        self.background = {"level": background_level, "min_size": background_min_size}
        self.register_buffer("gamma", torch.ones(()))
        self.register_buffer("pda", torch.zeros((), dtype=torch.bool))

    def on_epoch_start(self, epoch: int, loader, device: torch.device, dataset: str) -> None:
        self.gamma.fill_(dropout_gamma(epoch, **self.gamma_schedule))
        self.pda.fill_(epoch >= self.pda_start_epoch)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE (the original's ``multilabel_soft_margin_loss``, the same mean) of the classifier on the
        features times PDA's attention (when on), after channel dropout."""
        features = self.features(images)
        if bool(self.pda):
            features = features * dropout_attention(self.classifier(features), float(self.gamma)).to(features.dtype)
        features = F.dropout2d(features, self.feature_dropout, self.training)
        loss = F.binary_cross_entropy_with_logits(image_logits(self.classifier(features)), targets)
        return loss, {"gamma": float(self.gamma), "pda": float(self.pda), "bce": float(loss.detach())}

    def pseudo_masks(self, images: torch.Tensor, targets: torch.Tensor, dataset: DatasetSpec) -> list[torch.Tensor]:
        """One pseudo mask (B, H, W) int64 per layer of :data:`PSEUDO_MASK_LAYERS`; background ignored
        on the datasets whose background is white glass."""
        maps, _ = gradcam_per_layer(self, images)
        background = gray_background_mask(images, **self.background) if dataset.white_glass else None
        return [pseudo_mask(layer_maps, targets, images.shape[-2:], background) for layer_maps in maps]


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
        self.num_classes = num_classes

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
        terms = [F.cross_entropy(logits, targets[:, k], ignore_index=self.num_classes)
                 for k in range(len(PSEUDO_MASK_LAYERS))]
        loss = sum(weight * term for weight, term in zip(self.pseudo_mask_weights, terms, strict=True))
        return loss, {f"ce_{name}": float(term.detach()) for name, term in zip(PSEUDO_MASK_LAYERS, terms, strict=True)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """DeepLabV3+ softmax (B, C, H, W) with the classes the classifier puts below the gate zeroed."""
        probabilities = torch.sigmoid(self.classifier(images))
        scores = torch.softmax(self.segmenter(images).float(), dim=1)
        return gate_classes(scores, probabilities, self.gate_threshold)
