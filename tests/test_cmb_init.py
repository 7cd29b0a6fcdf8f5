"""The CMB branch starts as the VMamba code the authors built on (VM-UNet's VSSM): Linear weights
trunc_normal(std 0.02) with zero biases, LayerNorms 1/0 with VSSM's eps, stochastic depth 0 -> 0.2."""

import pytest
import torch
from torch import nn

from pathmamba.models.cmb import VMUNET_DROP_PATH_RATE, CMBEncoder, DropPath
from pathmamba.models.pathmamba import PathMamba


@pytest.fixture(scope="module")
def paper_size():
    """The paper-size CMB branch (dims 96..768, depths 2/2/9/2), with the DCL stage classifiers."""
    torch.manual_seed(0)
    return PathMamba(use_miml=False, use_dcl=True)


def linears(model):
    parts = (model.encoder, model.decoder, model.stage_classifiers)
    return [m for part in parts for m in part.modules() if isinstance(m, nn.Linear)]


def test_paper_size_cmb_linear_weights_have_std_0_02_and_zero_biases(paper_size):
    layers = linears(paper_size)
    assert len(layers) == 73  # 63 in the encoder, 6 in the decoder, 4 stage classifiers
    for layer in layers:
        w = layer.weight.detach()
        # std of n samples of N(0, 0.02) is 0.02 within a few 0.02 / sqrt(2n); the smallest layer has 384
        tolerance = 5 * 0.02 / (2 * w.numel()) ** 0.5
        assert abs(w.std().item() - 0.02) < tolerance, (layer, w.std().item())
        assert abs(w.mean().item()) < 5 * 0.02 / w.numel() ** 0.5
        assert w.abs().max() <= 2  # truncated at +-2, as timm's trunc_normal_
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0
    everything = torch.cat([layer.weight.detach().flatten() for layer in layers])
    assert abs(everything.std().item() - 0.02) < 1e-4  # PyTorch's default init gave 0.0224 overall


def test_paper_size_cmb_layer_norms_and_drop_path_rates(paper_size):
    norms = [m for m in paper_size.modules() if isinstance(m, nn.LayerNorm)]
    assert {m.eps for m in norms} == {1e-5}  # VSSM passes nn.LayerNorm (eps 1e-5) to its blocks
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    rates = [m.p for m in paper_size.encoder.modules() if isinstance(m, DropPath)]
    assert VMUNET_DROP_PATH_RATE == 0.2
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 15))  # 2 + 2 + 9 + 2 layers


def test_init_std_norm_eps_and_drop_path_rate_are_keywords():
    torch.manual_seed(0)
    encoder = CMBEncoder(dims=(8, 16), depths=(1, 2), d_state=4, init_std=0.5, norm_eps=1e-6, drop_path_rate=0.1)
    big = [m.weight for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert torch.cat([w.detach().flatten() for w in big]).std() > 0.3
    assert {m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)} == {1e-6, 1e-5}  # out_norm: SS2D's own
    assert [m.p for m in encoder.modules() if isinstance(m, DropPath)] == pytest.approx([0.0, 0.05, 0.1])


def test_drop_path_drops_whole_samples_in_training_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 2, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    # each sample is either dropped (0) or kept and scaled by 1 / (1 - p), all its elements alike
    assert torch.all((per_sample == 0) | torch.isclose(per_sample, torch.tensor(1 / 0.75), rtol=1e-6, atol=0))
    assert torch.all(per_sample.amin(1) == per_sample.amax(1))
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(y.mean().item() - 1) < 0.05  # unbiased
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
