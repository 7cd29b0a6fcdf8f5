"""PathMamba: contrast map, GM pooling, and every registered variant built, trained a few steps, predicted."""

from itertools import pairwise

import pytest
import torch

from pathmamba.engine.registry import build_method
from pathmamba.models.cmb import contrast_map
from pathmamba.models.pathmamba import PathMamba, gm_pool

# Tiny widths keep a training step at 64 px to some tens of milliseconds on 2 cores. 64 px, not 32: at
# 32 px the last stage is 1x1, a sequence of one step, where A rightly gets no gradient.
TINY = {"dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "d_state": 4, "decoder_dim": 16, "backbone": "resnet18"}
VARIANTS = [
    "pathmamba-b",
    "pathmamba-b-miml",
    "pathmamba-b-cmb",
    "pathmamba-b-miml-cmb",
    "pathmamba",
    "pathmamba-noscan",
]
SSM_PARAMS = {"x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"}


def batch(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)[:n]
    return images, targets


def names(model):
    return {n for n, _ in model.named_parameters()}


def test_contrast_map_range_shape_and_finite():
    torch.manual_seed(0)
    c = contrast_map(torch.randn(3, 16, 7, 5), torch.rand(3, 1, 7, 5))
    assert c.shape == (3, 1, 7, 5)
    assert torch.isfinite(c).all() and c.min() >= 0 and c.max() <= 1
    # each image is normalised on its own: its max is 1 and its min 0
    torch.testing.assert_close(c.amax((1, 2, 3)), torch.ones(3))
    torch.testing.assert_close(c.amin((1, 2, 3)), torch.zeros(3))
    # a flat feature map carries no contrast
    assert contrast_map(torch.ones(1, 4, 3, 3), torch.rand(1, 1, 3, 3)).abs().max() == 0


def test_contrast_map_singles_out_the_strong_region():
    # strong region (rows 0-2) has features near a; the rest near b, orthogonal to a; the saliency
    # points at the strong region, so its patches must get the highest contrast
    torch.manual_seed(0)
    h, w, ch = 8, 8, 6
    a, b = torch.zeros(ch), torch.zeros(ch)
    a[0], b[1] = 1.0, 1.0
    feats = b[:, None, None].expand(ch, h, w).clone()
    feats[:, :3] = a[:, None, None]
    feats = feats + 0.05 * torch.randn(ch, h, w)
    saliency = torch.zeros(1, 1, h, w)
    saliency[..., :3, :] = 1.0
    c = contrast_map(feats[None], saliency, q=0.2, eta=0.5)[0, 0]
    assert c[:3].min() > 0.8 and c[3:].max() < 0.05


def test_gm_pool_is_mean_at_r1_and_tends_to_max():
    torch.manual_seed(0)
    p = torch.rand(2, 4, 9, 9) * 0.9 + 0.05
    torch.testing.assert_close(gm_pool(p, r=1), p.mean((2, 3)))
    mx = p.amax((2, 3))
    gaps = [(mx - gm_pool(p, r)).max().item() for r in (1, 4, 16, 64, 512)]
    assert all(g0 > g1 for g0, g1 in pairwise(gaps)), gaps  # power-mean monotone in r
    assert gaps[-1] < 0.01


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_shapes_training_and_gradients(name):
    torch.manual_seed(0)
    model = build_method(name, num_classes=4, **TINY)
    images, targets = batch()

    # finite outputs of the right shapes
    out = model(images)
    assert out["y2"].shape == (4, 4, 64, 64)
    assert (out["y1"] is not None) == model.use_miml
    probs = model.image_probs(out)
    assert probs.shape == (4, 4) and torch.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()

    # gradients reach every parameter
    loss, parts = model.loss(images, targets)
    assert set(parts) == ({"bce", "dcl"} if model.use_dcl else {"bce"})
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # the loss goes down on a tiny batch it can overfit (20 steps: from VMamba's small initial weights,
    # std 0.02, the variants without MIML start at p = 0.5 and take some steps to move)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = model.loss(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    model.eval()
    scores = model.predict(images)
    assert scores.shape == (4, 4, 64, 64) and torch.isfinite(scores).all()


def test_flags_change_parameters_and_graph():
    torch.manual_seed(0)
    models = {n: build_method(n, num_classes=4, **TINY) for n in VARIANTS}
    p = {n: names(m) for n, m in models.items()}
    base = p["pathmamba-b"]
    assert not any(n.startswith(("miml.", "stage_classifiers.")) for n in base)
    assert {n.rsplit(".", 1)[-1] for n in base} >= SSM_PARAMS
    miml = p["pathmamba-b-miml"] - base
    assert miml and all(n.startswith("miml.") for n in miml)
    # the contrast map has no parameters of its own (Eq. 2): same parameters, different graph
    assert p["pathmamba-b-cmb"] == base and p["pathmamba-b-miml-cmb"] == p["pathmamba-b-miml"]
    dcl = p["pathmamba"] - p["pathmamba-b-miml-cmb"]
    assert dcl and all(n.startswith("stage_classifiers.") for n in dcl)
    noscan_only, scan_only = p["pathmamba-noscan"] - p["pathmamba"], p["pathmamba"] - p["pathmamba-noscan"]
    assert noscan_only and all(".spatial." in n for n in noscan_only)
    assert {n.rsplit(".", 1)[-1] for n in scan_only} == SSM_PARAMS

    images, _ = batch()
    for plain, contrast in [("pathmamba-b", "pathmamba-b-cmb"), ("pathmamba-b-miml", "pathmamba-b-miml-cmb")]:
        models[contrast].load_state_dict(models[plain].state_dict())
        with torch.no_grad():
            y_plain, y_contrast = models[plain](images)["y2"], models[contrast](images)["y2"]
        assert not torch.allclose(y_plain, y_contrast), f"{contrast} computes the same as {plain}"


def test_predict_gates_absent_classes():
    torch.manual_seed(0)
    model = PathMamba(4, gate=0.5, **TINY).eval()
    images, _ = batch(2)
    image_probs = torch.tensor([[0.9, 0.2, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]])
    model.image_probs = lambda out: image_probs
    scores = model.predict(images)
    mask = scores.argmax(1)
    assert not (mask[0] == 1).any()  # gated off where others are present
    # all gated off: every score drops by one, so the ungated ranking decides
    pixel = model.pixel_probs(model(images))
    torch.testing.assert_close(scores[1], pixel[1] - 1)


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match="mixer="):
        PathMamba(4, mixer="mamba2", **TINY)
    with pytest.raises(ValueError, match="dcl_stage_weights"):
        PathMamba(4, dcl_stage_weights=(1.0,), **TINY)
