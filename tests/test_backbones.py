"""Our ResNet against torchvision's: the same state-dict keys and shapes (ImageNet files load unchanged)
and, given the same weights, the same outputs."""

import pytest
import torch
import torchvision

from pathmamba.models.backbones import (
    RESNETS,
    build_resnet,
    reduce_output_stride,
    resnet_stages,
    stage_channels,
)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_state_dict_matches_torchvision_and_outputs_agree(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = build_resnet(name).eval()
    theirs = reference.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(ours.state_dict()[key].shape == theirs[key].shape for key in theirs)
    ours.load_state_dict(theirs)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_narrow_stages_have_the_announced_channels_and_strides(name):
    model = reduce_output_stride(build_resnet(name, width=8), output_stride=8)
    x = torch.randn(1, 3, 64, 64)
    sizes = []
    for stage, channels in zip(resnet_stages(model), stage_channels(name, width=8), strict=True):
        x = stage(x)
        assert x.shape[1] == channels
        sizes.append(x.shape[-1])
    assert sizes == [16, 8, 8, 8]  # stride 4 after the stem, 8 after layer2, kept by output_stride 8


def test_initialisation_is_torchvision_s():
    model = build_resnet("resnet18", width=16)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k))
    std = float(model.layer4[0].conv2.weight.std())
    assert std == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
