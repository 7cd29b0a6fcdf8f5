"""segmentation-models-pytorch networks with the project's convention for pretrained encoder weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("baselines.segmenters")


def smp_network(architecture: type[nn.Module], encoder: str, pretrained: str, owner: str, **kwargs: Any) -> nn.Module:
    """``architecture(encoder_name=encoder, ...)`` (e.g. ``smp.Unet``) with its encoder weights from
    ``pretrained``: ``"none"`` (random init), ``"imagenet"`` (smp's ImageNet weights, downloaded at build
    time; for a timm encoder, ``"tu-..."``, timm's default pretrained tag) or the path of a torchvision
    ResNet state dict (the workflow's ``fetch_weights`` output, for offline compute nodes: smp's ResNet
    encoders are torchvision ResNets, so the file loads into the encoder unchanged). A missing file is an
    error naming ``owner`` (the method), never a silent random init."""
    weights_file = None if pretrained in ("none", "imagenet") else Path(pretrained)
    if weights_file is not None and not weights_file.is_file():
        raise FileNotFoundError(f"{owner}: pretrained weights file {weights_file} does not exist; set it to "
                                "'none', 'imagenet' or the path of a saved state dict")
    if pretrained == "imagenet":
        weights = True if encoder.startswith("tu-") else "imagenet"
    else:
        weights = None
    network = architecture(encoder_name=encoder, encoder_weights=weights, **kwargs)
    if weights_file is not None:
        network.encoder.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        log.info("%s: loaded %s encoder weights from %s", owner, encoder, weights_file)
    return network
