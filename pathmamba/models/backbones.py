"""ResNet backbones shared by PathMamba's MIML branch and the CAM baselines.

Pretrained weights are never fetched silently: ``pretrained`` is ``"none"`` (random init, tests and
demo), ``"imagenet"`` (torchvision's ImageNet weights through its download cache, ``TORCH_HOME``), or a
path to a saved state dict, such as the workflow's ``resources/weights/<backbone>-imagenet.pth``
(fetched once by ``python -m pathmamba fetch-weights``, for offline compute nodes). A missing file is
an error, not a silent random init.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

log = logging.getLogger("pathmamba.models")

RESNETS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
}


def build_resnet(name: str = "resnet50", pretrained: str = "none", width: int = 64) -> torchvision.models.ResNet:
    """A torchvision ResNet with the requested weights (its ``fc`` is left in place, unused by callers).

    ``width`` is the number of channels of the stem and of layer1 (64 in every published ResNet; the
    later stages double it). Narrower networks exist for CPU demos and tests and have no pretrained
    weights.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNETS)}")
    if width != 64 and pretrained != "none":
        raise ValueError(f"pretrained weights exist only for width 64, got width={width} with "
                         f"pretrained={pretrained!r}")
    factory, weights_enum = RESNETS[name]
    if pretrained == "imagenet":
        return factory(weights=getattr(torchvision.models, weights_enum).IMAGENET1K_V1)
    model = factory(weights=None)
    if width != 64:
        _narrow(model, width)
    if pretrained != "none":
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights file {path} does not exist; set 'pretrained' to 'none', 'imagenet' "
                "or the path of a saved state dict"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("%s: loaded weights from %s", name, path)  # the training log shows which file ran
    return model


def imagenet_weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet weights of backbone ``name``; the file name ends with
    the leading hex digits of the file's SHA-256 (``resnet50-0676ba61.pth``)."""
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNETS)}")
    return getattr(torchvision.models, RESNETS[name][1]).IMAGENET1K_V1.url


def _narrow(model: torchvision.models.ResNet, width: int) -> None:
    """Rebuild the stem and the four layers of ``model`` with ``width`` base channels, in place."""
    block = type(model.layer1[0])
    depths = [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, depths[0])
    model.layer2 = model._make_layer(block, width * 2, depths[1], stride=2)
    model.layer3 = model._make_layer(block, width * 4, depths[2], stride=2)
    model.layer4 = model._make_layer(block, width * 8, depths[3], stride=2)
    model.fc = nn.Linear(width * 8 * block.expansion, model.fc.out_features)


def resnet_stages(model: torchvision.models.ResNet, depth: int = 4) -> nn.ModuleList:
    """The stem + layer1 as stage 1, then layer2.. up to ``depth`` stages, as a ModuleList."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    layers = [model.layer2, model.layer3, model.layer4]
    return nn.ModuleList([stem, *layers[: depth - 1]])


def stage_channels(name: str, depth: int = 4, width: int = 64) -> list[int]:
    """Output channels of each stage of ``resnet_stages`` for backbone ``name``."""
    expansion = 1 if name in ("resnet18", "resnet34") else 4  # basic blocks, else bottlenecks
    return [width * expansion * 2**i for i in range(depth)]


def reduce_output_stride(model: torchvision.models.ResNet, output_stride: int = 32) -> torchvision.models.ResNet:
    """Remove the stride of layer4 (output stride 16) and also layer3 (8), in place.

    Class activation maps need a finer grid than 1/32 of the input, the more so on small demo
    patches; WSSS methods do the same. Works for basic and bottleneck blocks alike because torchvision
    puts a block's stride on the convolution whose ``stride`` is not 1 and on its downsample.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    layers = {32: [], 16: [model.layer4], 8: [model.layer3, model.layer4]}[output_stride]
    for layer in layers:
        first = layer[0]
        for conv in (first.conv1, first.conv2):
            conv.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)
    return model
