"""Parity with the original code: each component's math against the original's operations, written out
here independently (numpy / OpenCV / plain loops, following the originals' order of operations, not
their code) on a small case, with explicit tolerances. A later change that breaks parity fails here.

Originals: HistoSegNet ``lyndonchan/hsn_v1`` (``hsn_v1/gradcam.py``), the PathMamba authors'
``hemo0826/PathMamba`` (``models/mil.py``, ``functions/train.py``, ``utils.py``), VM-UNet
``JCruan519/VM-UNet`` (``models/vmunet/vmamba.py``, SS2D), SC-CAM ``Juliachang/SC-CAM``
(``script.sh``, ``train_cls.py``), WSSS-Tissue ``ChuHan89/WSSS-Tissue``.
"""

import cv2
import numpy as np
import pytest
import torch

from baselines.cam.gradcam import grad_cam_maps
from baselines.cam.histosegnet import HistoSegNet, histosegnet_grad_cam

# --- HistoSegNet's Grad-CAM (hsn_v1/gradcam.py, grad_cam_batch) -----------------------------------------


def hsn_grad_cam_reference(features: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """The original's steps, in float64: features A (B, F, h, w) of the last layer, classifier W (C, F)
    applied before global average pooling, so d logit_c / d A_k(x, y) = W_ck / (h w). Gradient scaled by
    its root mean square over the whole batch (+1e-5); weights = its spatial mean; cam = sum_k w_k A_k;
    cv2.resize to the image (INTER_LINEAR); np.maximum(., 0); divided by max(max, 1e-7)."""
    B, _, h, w = features.shape
    out = np.empty((B, weight.shape[0], size, size))
    for c in range(weight.shape[0]):
        grads = np.broadcast_to(weight[c][None, :, None, None] / (h * w), features.shape)
        grads = grads / (np.sqrt(np.mean(np.square(grads))) + 1e-5)
        alphas = grads.mean(axis=(2, 3))
        cams = np.einsum("bkxy,bk->bxy", features, alphas)
        for b in range(B):
            resized = cv2.resize(cams[b], (size, size))  # cv2 takes (width, height)
            resized = np.maximum(resized, 0)
            out[b, c] = resized / np.maximum(resized.max(), 1e-7)
    return out


def test_histosegnet_grad_cam_matches_the_originals_order():
    torch.manual_seed(0)
    model = HistoSegNet(num_classes=4, backbone="resnet18", width=8, output_stride=8).eval()
    images = torch.randn(3, 3, 32, 32)
    ours = histosegnet_grad_cam(model, images).double().numpy()
    with torch.no_grad():
        features = model.features(images).double().numpy()
    weight = model.classifier.weight.detach().double().numpy()[:, :, 0, 0]
    reference = hsn_grad_cam_reference(features, weight, 32)
    assert ours.shape == reference.shape == (3, 4, 32, 32)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)  # measured 5e-7 (float32)
    # pytorch-grad-cam's order (ReLU and min-max on the grid, then resize), used before, differs
    package = grad_cam_maps(model, [model.features[-1]], images, 4).double().numpy()
    assert np.abs(package - reference).max() > 0.05


# --- MIML (the authors' models/mil.py and functions/train.py) --------------------------------------------


def upsample_aligned_corners(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling with aligned corners (nn.Upsample(align_corners=True)) written out: output
    pixel i samples the input at i (n - 1) / (size - 1). (C, n, n) -> (C, size, size)."""
    n = x.shape[-1]
    pos = np.arange(size) * (n - 1) / (size - 1)
    lo = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - lo
    rows = x[:, lo] * (1 - frac)[None, :, None] + x[:, lo + 1] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac) + rows[:, :, lo + 1] * frac


def test_miml_fuses_side_probabilities_at_strides_2_4_8_as_the_authors_mil():
    """mil.py: per side a 1x1 convolution, upsampling (aligned corners) to the input, a sigmoid; then
    Y' = 0.2 S1 + 0.35 S2 + 0.45 S3, probabilities. Side features at strides 2, 4 and 8."""
    from pathmamba.models.miml import MIMLBranch

    torch.manual_seed(0)
    size = 32
    branch = MIMLBranch(4, backbone="resnet18", width=8).eval()
    images = torch.randn(2, 3, size, size)
    features, x = [], images
    with torch.no_grad():
        for stage in branch.stages:
            x = stage(x)
            features.append(x.double().numpy())
        fused, sides = branch(images)
    assert [f.shape[-1] for f in features] == [size // 2, size // 4, size // 8]  # strides 2, 4, 8
    reference_sides = []
    for feat, conv in zip(features, branch.side_classifiers, strict=True):
        w = conv.weight.detach().double().numpy()[:, :, 0, 0]
        b = conv.bias.detach().double().numpy()
        logits = np.einsum("bfxy,cf->bcxy", feat, w) + b[None, :, None, None]
        up = np.stack([upsample_aligned_corners(image, size) for image in logits])
        reference_sides.append(1 / (1 + np.exp(-up)))
    reference = 0.2 * reference_sides[0] + 0.35 * reference_sides[1] + 0.45 * reference_sides[2]
    for ours, ref in zip(sides, reference_sides, strict=True):
        np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fused.double().numpy(), reference, atol=1e-6, rtol=0)
    assert fused.min() >= 0 and fused.max() <= 1  # a probability map: Y' is not summed logits


def test_pathmamba_dcl_side_terms_are_the_authors_unweighted_bce_of_gm_pooled_side_maps():
    """functions/train.py: BCE(gm(map, r), label) summed over the side maps with weight 1 (per class
    here: their gm pools one map per image); with the stage maps' and Eq. 3's terms added as the paper."""
    from pathmamba.models.pathmamba import PathMamba

    torch.manual_seed(0)
    model = PathMamba(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), d_state=4, decoder_dim=16,
                      backbone="resnet18", backbone_width=8).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    with torch.no_grad():
        out = model(images)
        loss, parts = model.loss(images, targets)

    def gm(p, r=4.0):
        p = np.clip(p.double().numpy(), 1e-6, None)
        return np.mean(p**r, axis=(2, 3)) ** (1 / r)

    def bce(p, y):
        p, y = np.clip(p, 1e-6, 1 - 1e-6), y.double().numpy()
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    sides = sum(bce(gm(s), targets) for s in out["sides"])
    stages = sum(w * bce(gm(torch.sigmoid(s)), targets) for w, s in zip((0.1, 0.2, 0.3, 0.4), out["stages"],
                                                                       strict=True))
    main = bce(0.5 * gm(out["y1"]) + 0.5 * gm(torch.sigmoid(out["y2"])), targets)
    assert model.dcl_miml_weights == (1.0, 1.0, 1.0)
    assert parts["dcl"] == pytest.approx(sides + stages, abs=1e-5)
    assert float(loss) == pytest.approx(main + sides + stages, abs=1e-5)


# --- DC-Mamba without contrast = VM-UNet's SS2D (models/vmunet/vmamba.py, SS2D.forward) ------------------


def silu(x):
    return x / (1 + np.exp(-x))


def ss2d_reference(m, x: np.ndarray) -> np.ndarray:
    """SS2D in float64 with explicit loops: in-projection to (x, z); depthwise convolution (with bias) and
    SiLU on x; four scans (row-major, column-major, each also reversed), each with its own projections:
    delta = softplus(dt_proj(x_proj_dt) + bias), h_t = exp(delta A) h_{t-1} + delta B_t u_t,
    y_t = C_t h_t + D u_t; each direction's outputs put back at their pixels and summed; LayerNorm;
    times SiLU(z); out-projection. x (H, W, C) one image -> (H, W, C)."""
    P = {name: t.detach().double().numpy() for name, t in m.state_dict().items()}
    H, W, _ = x.shape
    Di, N, R = m.d_inner, m.d_state, m.dt_rank
    xz = x @ P["in_proj.weight"].T
    u, z = xz[..., :Di], xz[..., Di:]
    k = P["conv2d.weight"].shape[-1]
    padded = np.pad(u, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    conv = np.zeros_like(u)
    for i in range(H):
        for j in range(W):
            patch = padded[i:i + k, j:j + k]  # (k, k, Di)
            conv[i, j] = np.einsum("abd,dab->d", patch, P["conv2d.weight"][:, 0]) + P["conv2d.bias"]
    u = silu(conv)
    row_major = [(i, j) for i in range(H) for j in range(W)]
    column_major = [(i, j) for j in range(W) for i in range(H)]
    orders = [row_major, column_major, row_major[::-1], column_major[::-1]]
    A = -np.exp(P["A_logs"]).reshape(4, Di, N)
    D = P["Ds"].reshape(4, Di)
    y = np.zeros((H, W, Di))
    for d, order in enumerate(orders):
        h = np.zeros((Di, N))
        for i, j in order:
            dbl = P["x_proj_weight"][d] @ u[i, j]  # (R + 2N)
            dt, B, C = dbl[:R], dbl[R:R + N], dbl[R + N:]
            delta = np.log1p(np.exp(P["dt_projs_weight"][d] @ dt + P["dt_projs_bias"][d]))  # (Di)
            h = np.exp(delta[:, None] * A[d]) * h + (delta * u[i, j])[:, None] * B[None, :]
            y[i, j] += h @ C + D[d] * u[i, j]
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    y = (y - mean) / np.sqrt(var + m.out_norm.eps) * P["out_norm.weight"] + P["out_norm.bias"]
    return (y * silu(z)) @ P["out_proj.weight"].T


def test_dc_mamba_without_contrast_is_vmunets_ss2d():
    from pathmamba.models.cmb import DCMamba

    torch.manual_seed(0)
    m = DCMamba(4, d_state=3).eval()
    with torch.no_grad():  # non-trivial norm parameters, so that a swapped one would show
        m.out_norm.weight.uniform_(0.5, 1.5)
        m.out_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 5, 4)  # H != W: a transposed scan order would show
    with torch.no_grad():
        ours = m(x).double().numpy()
    for b in range(2):
        np.testing.assert_allclose(ours[b], ss2d_reference(m, x[b].double().numpy()), atol=2e-5, rtol=0)


# --- metric protocol = WSSS-Tissue's evaluator (tool/iouutils.py, scores) -----------------------------


def test_primary_protocol_is_wsss_tissues_scores():
    """scores(): prediction set to 4 where the truth is 4, one 5x5 histogram over all images, its [4, 4]
    cell zeroed, IoU of classes 0..3 = diag / (row + column - diag), nan-mean; mean accuracy = recall."""
    from pathmamba.engine.metrics import SegmentationMeter

    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 5, (6, 7)) for _ in range(5)]
    truths[0][:] = np.where(truths[0] == 2, 4, truths[0])  # a class absent from one image
    preds = [rng.integers(0, 4, (6, 7)) for _ in range(5)]
    hist = np.zeros((5, 5))
    for truth, pred in zip(truths, preds, strict=True):
        pred = np.where(truth == 4, 4, pred)
        hist += np.bincount(5 * truth.ravel() + pred.ravel(), minlength=25).reshape(5, 5)
    hist[4, 4] = 0
    diag = np.diag(hist)[:4]
    iou = diag / (hist.sum(1) + hist.sum(0) - np.diag(hist))[:4]
    recall = diag / hist.sum(1)[:4]
    dice = 2 * diag / (hist.sum(1) + hist.sum(0))[:4]
    meter = SegmentationMeter(4)
    meter.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(truths)))
    ours = meter.summary()["ignore_background"]
    assert ours["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-12)
    assert ours["mRecall"] == pytest.approx(np.nanmean(recall), abs=1e-12)
    assert ours["mDice"] == pytest.approx(np.nanmean(dice), abs=1e-12)


# --- WSSS-Tissue's pseudo masks (tool/gradcam.py, tool/infer_fun.py create_pseudo_mask, infer_utils) -----


def test_pseudo_masks_are_wsss_tissues_create_pseudo_mask():
    """Per class the signed Grad-CAM cv2.resize'd to the image; one min-max over the stack of all classes;
    cam_npy_to_cam_dict + dict2npy: the labelled classes' maps, zeros for the others; np.argmax (first
    index on ties). The only place ours may differ: a pixel where every labelled class sits at the global
    minimum (0), tied with the zeros of an unlabelled class; ours never gives an unlabelled class."""
    from baselines.cam.wsss_tissue import pseudo_mask

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 4, 7, 7))
    labels = np.array([[1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0]], dtype=np.float32)
    ours = pseudo_mask(torch.from_numpy(maps), torch.from_numpy(labels), (28, 28)).numpy()
    for b in range(3):
        resized = np.stack([cv2.resize(maps[b, c], (28, 28)) for c in range(4)])
        norm = (resized - resized.min()) / (resized.max() - resized.min())
        cam_npy = np.where(labels[b][:, None, None] == 1, norm, 0.0)
        reference = np.argmax(cam_npy, axis=0)
        tie = cam_npy.max(axis=0) == 0
        assert (ours[b][~tie] == reference[~tie]).all()
        assert tie.sum() <= 1  # the global minimum, at most one pixel of continuous maps
