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
from torch import nn

from pathmamba.core.download import download_file
from pathmamba.core.files import file_sha256

log = logging.getLogger("pathmamba.models")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and the residual; ResNet-18 and -34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (carrying the stride: ResNet v1.5, as torchvision), 1x1 and the residual; ResNet-50, -101."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet (He et al., CVPR 2016; v1.5) with its module names, so that its ImageNet state
    dicts load unchanged, and a ``width`` for narrow CPU variants. Defined here rather than imported
    because importing torchvision costs every job over a second (it imports torch's compiler stack).

    images (B, 3, H, W) -> ``fc`` logits (B, 1000) through ``forward``; callers use the stages.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], width: int = 64,
                 num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = width
        layers = []
        for index, depth in enumerate(depths):
            planes, stride = width * 2**index, 1 if index == 0 else 2
            downsample = None
            if stride != 1 or channels != planes * block.expansion:
                downsample = nn.Sequential(_conv1x1(channels, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(channels, planes, stride, downsample)]
            channels = planes * block.expansion
            blocks += [block(channels, planes) for _ in range(1, depth)]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        # torchvision's initialisation
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: Backbone name -> (block, blocks per stage, torchvision's weights enum for ImageNet).
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), "ResNet18_Weights"),
    "resnet34": (BasicBlock, (3, 4, 6, 3), "ResNet34_Weights"),
    "resnet50": (Bottleneck, (3, 4, 6, 3), "ResNet50_Weights"),
    "resnet101": (Bottleneck, (3, 4, 23, 3), "ResNet101_Weights"),
}


def build_resnet(name: str = "resnet50", pretrained: str = "none", width: int = 64) -> ResNet:
    """A ResNet with the requested weights (its ``fc`` is left in place, unused by callers).

    ``width`` is the number of channels of the stem and of layer1 (64 in every published ResNet; the
    later stages double it). Narrower networks exist for CPU demos and tests and have no pretrained
    weights.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNETS)}")
    if width != 64 and pretrained != "none":
        raise ValueError(f"pretrained weights exist only for width 64, got width={width} with "
                         f"pretrained={pretrained!r}")
    block, depths, _ = RESNETS[name]
    model = ResNet(block, depths, width)
    if pretrained == "imagenet":
        model.load_state_dict(_imagenet_weights(name).get_state_dict(progress=True, check_hash=True))
        log.info("%s: loaded ImageNet weights from torchvision's download cache", name)
    elif pretrained != "none":
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights file {path} does not exist; set 'pretrained' to 'none', 'imagenet' "
                "or the path of a saved state dict"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("%s: loaded weights from %s", name, path)  # the training log shows which file ran
    return model


def _imagenet_weights(name: str):
    """torchvision's ImageNet weights entry of backbone ``name`` (imported here only: see :class:`ResNet`)."""
    import torchvision

    return getattr(torchvision.models, RESNETS[name][2]).IMAGENET1K_V1


def imagenet_weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet weights of backbone ``name``; the file name ends with
    the leading hex digits of the file's SHA-256 (``resnet50-0676ba61.pth``)."""
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNETS)}")
    return _imagenet_weights(name).url


def fetch_imagenet_weights(name: str, out: Path, url: str | None = None) -> None:
    """Download backbone ``name``'s ImageNet weights file to ``out``, from ``url`` (a mirror) or
    torchvision's; either way its SHA-256 must start with the digits that torchvision's file name ends
    with (``resnet50-0676ba61.pth``)."""
    official = imagenet_weights_url(name)
    prefix = official.rsplit("-", 1)[1].split(".")[0]

    def not_torchvisions(path: Path) -> str | None:
        digest = file_sha256(path)
        return None if digest.startswith(prefix) else f"SHA-256 {digest} does not start with {prefix}"

    download_file(url or official, Path(out), check=not_torchvisions)
    log.info("wrote %s weights to %s", name, out)


def resnet_stages(model: ResNet, depth: int = 4) -> nn.ModuleList:
    """The stem + layer1 as stage 1, then layer2.. up to ``depth`` stages, as a ModuleList."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    layers = [model.layer2, model.layer3, model.layer4]
    return nn.ModuleList([stem, *layers[: depth - 1]])


def stage_channels(name: str, depth: int = 4, width: int = 64) -> list[int]:
    """Output channels of each stage of ``resnet_stages`` for backbone ``name``."""
    expansion = 1 if name in ("resnet18", "resnet34") else 4  # basic blocks, else bottlenecks
    return [width * expansion * 2**i for i in range(depth)]


def reduce_output_stride(model: ResNet, output_stride: int = 32) -> ResNet:
    """Remove the stride of layer4 (output stride 16) and also layer3 (8), in place.

    Class activation maps need a finer grid than 1/32 of the input, the more so on small demo
    patches; WSSS methods do the same. Works for basic and bottleneck blocks alike because a block's
    stride is on the convolution whose ``stride`` is not 1 and on its downsample.
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
