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
